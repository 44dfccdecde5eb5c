"""The binary substitute (Lin et al., arXiv 1510.03009): the paper's formulas, the layers against
F.linear/conv with α·sign(W), the straight-through and quantized-backprop gradients, 1-bit
packing on disk, the rewrite end to end, and the 1-bit kernel against its torch reference."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fxopt
from fxopt import substitutes
from fxopt.bits import pack_bits, pack_signs, unpack_bits, unpack_mask, unpack_signs
from fxopt.codegen import registry
from fxopt.layerwise import Layerwise
from fxopt.codegen import epilogue as ep
from fxopt.codegen.binary import binary_linear, binary_linear_reference
from conftest import DEVICE, GPU, GPU_MARKS, needs_triton
from fxopt.substitutes.binary import (
    BinaryConv, BinaryLinear, PackedBinaryLinear, QuantizedBackprop, binarize, channel_scales, hard_sigmoid,
    pow2_quantize, ternarize,
)



def _sign(w):  # sign with sign(0) = +1, as the layers binarize
    return torch.where(w >= 0, 1.0, -1.0).to(w.dtype)


# --- packing -------------------------------------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 9), k=st.integers(1, 100), seed=st.integers(0, 2**16))
def test_pack_roundtrip(n, k, seed):
    g = torch.Generator().manual_seed(seed)
    bits = torch.rand(n, k, generator=g) < 0.5
    words = pack_bits(bits)
    assert words.dtype == torch.int32 and words.shape == (n, math.ceil(k / 32))
    assert torch.equal(unpack_bits(words, k), bits)
    signs = torch.where(bits, 1.0, -1.0)
    assert torch.equal(unpack_signs(pack_signs(signs), k), signs)
    # the byte-table unpacking the reference runs agrees with the shift-and-mask definition
    assert torch.equal(unpack_mask(words, k, torch.float64), unpack_bits(words, k).double())
    assert torch.equal(unpack_signs(words, k, torch.bfloat16), (unpack_bits(words, k).float() * 2 - 1).bfloat16())


def test_pack_layout_is_little_endian_bits_of_int32_words():
    bits = torch.zeros(1, 40, dtype=torch.bool)
    bits[0, [0, 2, 31, 33]] = True
    words = pack_bits(bits)
    assert words[0, 0].item() == 1 + 4 - 2**31  # bits 0, 2 and 31 (the sign bit) of word 0
    assert words[0, 1].item() == 2  # column 33 = bit 1 of word 1


# --- the paper's quantizers ----------------------------------------------------------------------

def test_binarize_deterministic_is_sign_with_zero_positive():
    w = torch.tensor([-0.3, 0.0, 0.2, -1.0])
    assert binarize(w).tolist() == [-1.0, 1.0, 1.0, -1.0]


def test_binarize_stochastic_follows_hard_sigmoid():
    torch.manual_seed(0)
    w = torch.tensor([-1.0, -0.5, 0.0, 0.6, 1.0]).repeat(40_000, 1)
    p_plus = (binarize(w, stochastic=True) > 0).double().mean(0)
    expected = hard_sigmoid(w[0]).double()  # 0, 0.25, 0.5, 0.8, 1
    assert torch.allclose(p_plus, expected, atol=0.01), p_plus


def test_ternarize_deterministic_threshold_and_stochastic_probability():
    w = torch.tensor([[0.9, -0.1, 0.5, -0.6]])  # mean |w| = 0.525; threshold 0.7 → keep |w| > 0.3675
    assert ternarize(w, 0.7).tolist() == [[1.0, 0.0, 1.0, -1.0]]
    torch.manual_seed(1)
    many = w.repeat(40_000, 1)
    t = ternarize(many, 0.7, stochastic=True)
    assert torch.allclose((t != 0).double().mean(0), w[0].abs().double(), atol=0.01)
    assert torch.equal(t[t != 0], torch.sign(many)[t != 0])


def _pow2_reference(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Element by element, as the docstring states it."""
    top = x.abs().max().item()
    e_max = round(math.log2(top))
    out = []
    for v in x.flatten().tolist():
        if v == 0:
            out.append(0.0)
            continue
        e = min(round(math.log2(abs(v))), e_max)
        out.append(0.0 if e < e_max - (2**bits - 1) else math.copysign(2.0**e, v))
    return torch.tensor(out, dtype=x.dtype).view_as(x)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_pow2_quantize_matches_elementwise_formula(bits):
    torch.manual_seed(bits)
    x = torch.randn(64, 16, dtype=torch.float64) * torch.logspace(-4, 1, 16, dtype=torch.float64)
    x[0, 0] = 0.0
    q = pow2_quantize(x, bits)
    assert torch.equal(q, _pow2_reference(x, bits))
    nonzero = q[q != 0].abs()
    assert torch.equal(torch.exp2(torch.log2(nonzero).round()), nonzero)  # powers of two only
    assert len(torch.unique(nonzero)) <= 2**bits  # bits of exponent
    kept = q != 0
    ratio = (q[kept] / x[kept])  # rounding in the log domain: within a factor √2, same sign
    assert (ratio > 0).all() and (ratio.max() <= 2**0.5 + 1e-12) and ratio.min() >= 2**-0.5 - 1e-12


@pytest.mark.parametrize("mode", ["binary", "ternary"])
def test_channel_scale_is_least_squares_optimum(mode):
    torch.manual_seed(0)
    w = torch.randn(8, 40, dtype=torch.float64)
    q = binarize(w) if mode == "binary" else ternarize(w, 0.7)
    alpha = channel_scales(w, mode, 0.7)
    optimum = (w * q).sum(1) / (q * q).sum(1)  # argmin_α ‖w − α·q‖² per row
    assert torch.allclose(alpha, optimum)


# --- layers against F.linear / conv with α·sign(W) ------------------------------------------------

def test_binary_linear_equals_alpha_sign_w():
    torch.manual_seed(0)
    lin = nn.Linear(70, 33)
    x = torch.randn(6, 70)
    alpha = lin.weight.abs().mean(1, keepdim=True)
    ref = F.linear(x, alpha * torch.sign(lin.weight), lin.bias)
    layer = BinaryLinear.from_original(lin).eval()
    assert (layer(x) - ref).abs().max() < 1e-5
    packed = layer.packed()
    assert isinstance(packed, PackedBinaryLinear) and packed.signs.dtype == torch.int32
    assert (packed(x) - ref).abs().max() < 1e-5
    w = lin.weight.detach().double()
    expected = (w - alpha.double() * torch.sign(w)).norm() / w.norm()
    assert layer.reconstruction_error == pytest.approx(expected.item())


def test_ternary_linear_equals_alpha_ternary_w():
    torch.manual_seed(1)
    lin = nn.Linear(50, 20, bias=False)
    w = lin.weight.detach()
    keep = w.abs() > 0.7 * w.abs().mean(1, keepdim=True)
    alpha = (w.abs() * keep).sum(1, keepdim=True) / keep.sum(1, keepdim=True)
    ref_w = alpha * torch.sign(w) * keep
    x = torch.randn(4, 50)
    layer = BinaryLinear.from_original(lin, mode="ternary").eval()
    assert (layer(x) - F.linear(x, ref_w)).abs().max() < 1e-5
    packed = layer.packed()
    assert packed.mask is not None
    assert (packed(x) - F.linear(x, ref_w)).abs().max() < 1e-5


@pytest.mark.parametrize("conv", [
    nn.Conv2d(6, 8, 3, padding=1),
    nn.Conv2d(6, 8, (3, 5), stride=2, padding=(0, 2), dilation=(2, 1)),
    nn.Conv2d(6, 8, 3, groups=2, bias=False),
    nn.Conv1d(4, 6, 5, stride=2, padding=2),
])
@pytest.mark.parametrize("mode", ["binary", "ternary"])
def test_binary_conv_equals_alpha_sign_w(conv, mode):
    torch.manual_seed(2)
    w = conv.weight.detach()
    flat = w.flatten(1).abs()
    keep = torch.ones_like(w, dtype=torch.bool) if mode == "binary" else \
        w.abs() > 0.7 * flat.mean(1).view(-1, *[1] * (w.dim() - 1))
    alpha = (flat * keep.flatten(1)).sum(1) / keep.flatten(1).sum(1)
    ref_w = alpha.view(-1, *[1] * (w.dim() - 1)) * torch.sign(w) * keep
    x = torch.randn(2, conv.in_channels, *([11] * (w.dim() - 2)))
    ref = conv._conv_forward(x, ref_w, conv.bias)
    layer = BinaryConv.from_original(conv, mode=mode).eval()
    assert (layer(x) - ref).abs().max() < 1e-5
    assert (layer.packed()(x) - ref).abs().max() < 1e-5


def test_conv_with_reflect_padding_declines():
    with pytest.raises(substitutes.Decline, match="padding_mode"):
        BinaryConv.from_original(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"))


def test_keeps_dtype():
    lin = nn.Linear(40, 8).double()
    layer = BinaryLinear.from_original(lin)
    assert layer.latent.dtype == layer.scale.dtype == torch.float64
    assert layer.packed()(torch.randn(2, 40, dtype=torch.float64)).dtype == torch.float64


# --- gradients: straight-through estimator and quantized back-propagation -------------------------

def test_straight_through_gradients_follow_the_formulas():
    torch.manual_seed(3)
    layer = BinaryLinear.from_original(nn.Linear(12, 5)).train()
    x = torch.randn(7, 12, requires_grad=True)
    g = torch.randn(7, 5)
    (layer(x) * g).sum().backward()
    wb = _sign(layer.latent.detach())
    alpha = layer.scale.detach()
    # y = x·(α⊙W_b)ᵀ + b: ∂L/∂W_b = α ⊙ gᵀx, passed unchanged to the latent weights
    assert torch.allclose(layer.latent.grad, alpha[:, None] * (g.T @ x.detach()), atol=1e-6)
    assert torch.allclose(layer.scale.grad, ((g.T @ x.detach()) * wb).sum(1), atol=1e-5)
    assert torch.allclose(x.grad, g @ (alpha[:, None] * wb), atol=1e-6)  # δ propagates through binary weights


@pytest.mark.parametrize("bits", [2, 3])
def test_quantized_backprop_linear_uses_pow2_inputs(bits):
    torch.manual_seed(4)
    layer = BinaryLinear.from_original(nn.Linear(12, 5), backprop_bits=bits).train()
    x = torch.randn(3, 7, 12, requires_grad=True)  # leading dims are flattened into the batch
    g = torch.randn(3, 7, 5)
    (layer(x) * g).sum().backward()
    alpha, wb = layer.scale.detach(), _sign(layer.latent.detach())
    xq = pow2_quantize(x.detach(), bits)
    assert not torch.equal(xq, x.detach())
    assert torch.allclose(layer.latent.grad, alpha[:, None] * (g.reshape(-1, 5).T @ xq.reshape(-1, 12)), atol=1e-5)
    assert torch.allclose(x.grad, g @ (alpha[:, None] * wb), atol=1e-6)  # input gradient stays exact


def test_quantized_backprop_conv_uses_pow2_inputs():
    torch.manual_seed(5)
    conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)
    layer = BinaryConv.from_original(conv, backprop_bits=3).train()
    x = torch.randn(2, 3, 9, 9, requires_grad=True)
    y = layer(x)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    alpha = layer.scale.detach().view(-1, 1, 1, 1)
    wb = _sign(layer.latent.detach())
    expected = alpha * torch.nn.grad.conv2d_weight(pow2_quantize(x.detach(), 3), wb.shape, g, 2, 1)
    assert torch.allclose(layer.latent.grad, expected, atol=1e-5)
    assert torch.allclose(x.grad, torch.nn.grad.conv2d_input(x.shape, alpha * wb, g, 2, 1), atol=1e-5)
    assert torch.allclose(layer.bias.grad, g.sum((0, 2, 3)), atol=1e-5)


def test_quantized_backprop_function_is_exact_when_inputs_are_powers_of_two():
    x = torch.tensor([[0.5, -2.0, 1.0]], requires_grad=True)
    w = torch.randn(2, 3, requires_grad=True)
    QuantizedBackprop.apply(x, w, 3, None).sum().backward()
    assert torch.allclose(w.grad, torch.ones(2, 1) @ x.detach())


def test_stochastic_binarization_only_in_training():
    torch.manual_seed(6)
    layer = BinaryLinear.from_original(nn.Linear(64, 16), stochastic=True)
    x = torch.randn(4, 64)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    assert not torch.equal(layer(x), layer(x))


def test_constrain_clips_latent_weights():
    layer = BinaryLinear.from_original(nn.Linear(8, 4))
    assert layer.latent.abs().max() <= 1
    with torch.no_grad():
        layer.latent.mul_(5)
    substitutes.constrain_([nn.Sequential(layer)])
    assert layer.latent.abs().max() <= 1


# --- the rewrite end to end: 1-bit on disk, load, validation records ------------------------------

def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                         nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 4)).eval()


def test_saved_binarized_layers_take_at_most_a_twentieth(tmp_path):
    model = _mlp()
    x = (torch.randn(8, 16),)
    result = fxopt.optimize(model, x, "binary", time_sites=False)
    sites = {s["key"]: s for s in result.report["sites"]}
    applied = [s for s in sites.values() if s["status"] == "applied"]
    assert [s["key"] for s in applied] == ["2", "4"]  # first and last layers stay dense
    for s in applied:
        assert s["bytes_after"] <= s["bytes_before"] / 20
        # uniform weights (nn.Linear's init): ‖W − α·sign W‖²/‖W‖² = 1 − (E|w|)²/E[w²] = 1 − 3/4
        assert s["reconstruction_error"] == pytest.approx(0.5, abs=0.01)
        assert s["error"]["cosine"] > 0.5
    result.save(tmp_path / "bin")
    torch.export.save(torch.export.export(model, x), tmp_path / "dense.pt2")
    dense_size = (tmp_path / "dense.pt2").stat().st_size
    bin_size = (tmp_path / "bin" / "model.pt2").stat().st_size
    fp32_binarized = sum(s["bytes_before"] for s in applied)
    on_disk = fp32_binarized - (dense_size - bin_size)  # what the binarized layers take in the file
    assert on_disk <= fp32_binarized / 20, (on_disk, fp32_binarized)
    e = result.report["end_to_end"]
    assert e["bytes_after"] < e["bytes_before"] / 2

    loaded = fxopt.load(tmp_path / "bin")
    batch = torch.randn(5, 16)
    assert torch.allclose(loaded(batch), result.model(batch), atol=1e-6)
    ref = batch  # the loaded model computes the binarized layers as F.linear(x, α·sign(W), b) exactly
    for i, layer in enumerate(model):
        if i in (2, 4):
            alpha = layer.weight.abs().mean(1, keepdim=True)
            ref = F.linear(ref, alpha * torch.sign(layer.weight), layer.bias)
        else:
            ref = layer(ref)
    assert (loaded(batch) - ref).abs().max() < 1e-5


def test_layerwise_training_improves_binary_sites_and_deploys_packed():
    model = _mlp()
    batches = [(torch.randn(64, 16),) for _ in range(4)]
    result = fxopt.optimize(model, batches[0], "binary", calibration=batches[1:], time_sites=False,
                            layerwise=Layerwise(steps=60, lr=1e-2, progress=False))
    for s in result.report["sites"]:
        if s["status"] == "applied":
            assert s["layerwise"]["loss_after"] < s["layerwise"]["loss_before"]
            assert s["error"]["sqnr_db"] > s["error_init"]["sqnr_db"]
    assert all(isinstance(m, PackedBinaryLinear) for _, m in result.substitutes)


def test_rule_parameters_are_checked(tmp_path):
    rules = tmp_path / "r.yaml"
    rules.write_text("version: 1\nrules:\n  - name: b\n    match: {op: linear}\n    substitute: binary\n"
                     "    params: {mode: quad}\n")
    with pytest.raises(fxopt.FxoptError, match=r"r\.yaml:6.*mode"):
        fxopt.rules.load(rules)


# --- the 1-bit kernel: registry, reference, Triton (interpreter on CPU) ---------------------------

def _packed(n, k, ternary=False, bias=True, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias)
    return BinaryLinear.from_original(lin, mode="ternary" if ternary else "binary").packed()


def test_registry_decision():
    x = torch.randn(2, 3)
    with registry.use_backend("torch"):
        assert not registry.wants_triton(x)
    with registry.use_backend("auto"):
        assert registry.wants_triton(x) == (x.is_cuda and registry.HAVE_TRITON)
    with pytest.raises(ValueError, match="unknown backend"):
        with registry.use_backend("cuda"):
            pass


def test_registry_refuses_triton_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with registry.use_backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        registry.wants_triton(torch.randn(2))




@needs_triton
@pytest.mark.parametrize("m", [1, 5, 16, 17, 40])  # GEMV path ≤ 16 rows, GEMM above; masked tails
@pytest.mark.parametrize("n,k", [(37, 70), (16, 64), (9, 200)])
@pytest.mark.parametrize("ternary", [False, True])
def test_kernel_matches_reference(m, n, k, ternary):
    p = _packed(n, k, ternary, seed=m + n + k).to(DEVICE)
    x = torch.randn(m, k, device=DEVICE)
    ref = binary_linear_reference(x, p.signs, p.scale, p.bias, p.mask, k, [], ())
    with registry.use_backend("triton"):
        out = binary_linear(x, p.signs, p.scale, p.bias, p.mask, k, [], "", "exact")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


# Generated epilogues, as the kron kernel takes them: every unary step, scalars, extras (an
# output-shaped residual and a per-channel vector), operands on the left, clamps.
CHAINS = [[[name]] for name in sorted(ep.UNARY)] + [
    [["gelu"], ["mul", 0.5], ["add", 0]],
    [["silu"], ["rsub", 1.0], ["mul", 1]],
    [["tanh"], ["add", 2.0], ["rdiv", 1], ["clamp", -1.0, None]],
    [["mul", 0], ["sub", 1], ["clamp", None, 0.25], ["add", 0]],
]


def _extras(chain, shape):
    """0 → a tensor of the output's shape, 1 → a per-channel vector (both > 0.5)."""
    n = ep.extras_used(ep.check(chain))
    return [torch.rand(shape if i == 0 else shape[-1:], device=DEVICE) + 0.5 for i in range(n)]


@needs_triton
@pytest.mark.parametrize("chain", CHAINS, ids=lambda c: "-".join(s[0] for s in c))
@pytest.mark.parametrize("m", [3, 24])  # GEMV and GEMM paths
def test_kernel_generated_epilogues(chain, m):
    p = _packed(21, 45, bias=m == 3, seed=7).to(DEVICE)
    x = torch.randn(2, m, 45, device=DEVICE)  # leading dims kept
    extras = _extras(chain, (2, m, 21))
    ref = binary_linear_reference(x, p.signs, p.scale, p.bias, p.mask, 45, extras, ep.check(chain))
    with registry.use_backend("triton"):
        out = binary_linear(x, p.signs, p.scale, p.bias, p.mask, 45, extras, ep.encode(chain), "exact")
    assert out.shape == (2, m, 21)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@needs_triton
@pytest.mark.parametrize("dtype,m", [(torch.float16, 3), (torch.float16, 40), (torch.bfloat16, 3)]
                         + [(torch.bfloat16, 40)] * GPU)  # the interpreter's bf16 tl.dot returns garbage
def test_kernel_half_precision(dtype, m):
    p = _packed(24, 96, seed=8).to(DEVICE)
    x = torch.randn(m, 96, device=DEVICE, dtype=dtype)
    ref = binary_linear_reference(x.float(), p.signs, p.scale, p.bias, p.mask, 96, [], ())
    with registry.use_backend("triton"):
        out = binary_linear(x, p.signs, p.scale, p.bias, p.mask, 96, [], "", "exact")
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("chain", [[], [["gelu"], ["mul", 0], ["add", 1]]], ids=["plain", "epilogue"])
def test_op_gradient_and_opcheck(backend, chain):
    p = _packed(12, 40, seed=9)
    dense = p.dense_weight()
    x = torch.randn(5, 40, requires_grad=True)
    extras = [torch.rand(5, 12, requires_grad=True) + 0.5, torch.rand(12, requires_grad=True)][:ep.extras_used(ep.check(chain))]
    with registry.use_backend(backend):
        out = binary_linear(x, p.signs, p.scale, p.bias, p.mask, 40, extras, ep.encode(chain), "exact")
        g = torch.randn_like(out)
        grads = torch.autograd.grad(out, [x, *extras], g)
        torch.library.opcheck(binary_linear, (x.detach(), p.signs, p.scale, p.bias, p.mask, 40,
                                              [e.detach() for e in extras], ep.encode(chain), "exact"))
    xr = x.detach().requires_grad_()
    expected = torch.autograd.grad(ep.apply(F.linear(xr, dense, p.bias), ep.check(chain), extras), [xr, *extras], g)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_packed_layer_compiles():
    p = _packed(16, 48)
    x = torch.randn(3, 48)
    compiled = torch.compile(p, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), p(x))


@pytest.mark.parametrize("m", [pytest.param(m, marks=GPU_MARKS) for m in (1, 8, 512)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_kernel_real_sizes_on_gpu(m, dtype):
    p = _packed(4096, 4096, seed=10).cuda()
    x = torch.randn(m, 4096, device="cuda", dtype=dtype)
    ref = binary_linear_reference(x.float(), p.signs, p.scale, p.bias, p.mask, 4096, [], (("relu",),))
    with registry.use_backend("triton"):
        out = binary_linear(x, p.signs, p.scale, p.bias, p.mask, 4096, [], ep.encode([["relu"]]), "exact")
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol * ref.abs().max().item())
