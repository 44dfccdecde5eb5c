"""Kronecker substitute: against the materialised torch.kron product (the paper's math), against
the original layers (from_original), and the Van Loan–Pitsianis optimum."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from fxopt.substitutes import Decline, get
from fxopt.substitutes.kron import KronConv, KronConv2d, KronLinear, choose_factors, nearest_kronecker_sum

dims = st.integers(1, 6)


def kron_sum(a, b):
    return sum(torch.kron(a[r], b[r]) for r in range(a.shape[0]))


@settings(max_examples=60, deadline=None)
@given(m1=dims, m2=dims, n1=dims, n2=dims, r=st.integers(1, 3), rows=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_forward_equals_materialised_kron_product(m1, m2, n1, n2, r, rows, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(r, m1, n1, generator=g, dtype=torch.float64)
    b = torch.randn(r, m2, n2, generator=g, dtype=torch.float64)
    bias = torch.randn(m1 * m2, generator=g, dtype=torch.float64)
    x = torch.randn(rows, 2, n1 * n2, generator=g, dtype=torch.float64)
    layer = KronLinear(a, b, bias)
    expected = F.linear(x, kron_sum(a, b), bias)  # (Σ A_r ⊗ B_r) x, materialised
    torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(layer.dense_weight(), kron_sum(a, b))


@settings(max_examples=40, deadline=None)
@given(m=st.integers(1, 48), n=st.integers(1, 48), seed=st.integers(0, 2**16))
def test_full_rank_reproduces_the_original_linear(m, n, seed):
    torch.manual_seed(seed)
    linear = nn.Linear(n, m)
    layer = KronLinear.from_original(linear, rank="full")
    x = torch.randn(5, n)
    torch.testing.assert_close(layer(x), linear(x), rtol=0, atol=1e-5)
    assert layer.reconstruction_error < 1e-6


@settings(max_examples=25, deadline=None)
@given(m1=st.integers(2, 5), m2=st.integers(2, 5), n1=st.integers(2, 5), n2=st.integers(2, 5), seed=st.integers(0, 2**16))
def test_rank_r_error_is_the_svd_tail_and_non_increasing(m1, m2, n1, n2, seed):
    w = torch.randn(m1 * m2, n1 * n2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    full = min(m1 * n1, m2 * n2)
    errors = []
    for r in range(1, full + 1):
        a, b, reported = nearest_kronecker_sum(w, m1, m2, n1, n2, r)
        actual = (torch.linalg.norm(w - kron_sum(a, b)) / torch.linalg.norm(w)).item()
        assert math.isclose(actual, reported, rel_tol=1e-6, abs_tol=1e-9)
        errors.append(actual)
    assert all(later <= earlier + 1e-9 for earlier, later in zip(errors, errors[1:]))
    assert errors[-1] < 1e-9


def test_rank_one_recovers_an_exact_kronecker_product_and_beats_perturbed_factors():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(1, 4, 3, generator=g, dtype=torch.float64), torch.randn(1, 5, 2, generator=g, dtype=torch.float64)
    w = torch.kron(a[0], b[0])
    a_hat, b_hat, err = nearest_kronecker_sum(w, 4, 5, 3, 2, 1)
    assert err < 1e-12
    torch.testing.assert_close(kron_sum(a_hat, b_hat), w)
    # nearest in Frobenius norm: for a generic W, nudging the optimal factors never helps
    w = torch.randn(20, 6, generator=g, dtype=torch.float64)
    a_hat, b_hat, err = nearest_kronecker_sum(w, 4, 5, 3, 2, 2)
    best = torch.linalg.norm(w - kron_sum(a_hat, b_hat))
    for _ in range(20):
        da = a_hat + 1e-3 * torch.randn(a_hat.shape, generator=g, dtype=torch.float64)
        assert torch.linalg.norm(w - kron_sum(da, b_hat)) >= best


@pytest.mark.parametrize("kwargs", [
    dict(stride=1, padding=0), dict(stride=2, padding=1), dict(stride=1, padding=2, dilation=2),
    dict(stride=(2, 1), padding=(1, 0)), dict(stride=1, padding="same"),
])
def test_conv2d_full_rank_and_materialised(kwargs):
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 8, 3, **kwargs)
    x = torch.randn(2, 6, 11, 9)
    layer = KronConv.from_original(conv, rank="full")
    assert isinstance(layer, KronConv2d)
    torch.testing.assert_close(layer(x), conv(x), rtol=0, atol=1e-5)
    low = KronConv.from_original(conv, rank=2)
    expected = F.conv2d(x, low.dense_weight(), conv.bias, conv.stride, conv.padding, conv.dilation)
    torch.testing.assert_close(low(x), expected, rtol=1e-4, atol=1e-5)


def test_unbatched_conv_input():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 8, 3)
    x = torch.randn(4, 10, 10)
    torch.testing.assert_close(KronConv.from_original(conv, rank="full")(x), conv(x), rtol=0, atol=1e-5)


def test_conv1d_full_rank():
    torch.manual_seed(0)
    conv = nn.Conv1d(4, 6, 5, stride=2, padding=2, bias=False)
    x = torch.randn(3, 4, 17)
    torch.testing.assert_close(KronConv.from_original(conv, rank="full")(x), conv(x), rtol=0, atol=1e-5)


def test_factors_are_balanced_and_explicit_factors_are_checked():
    assert choose_factors(256, 256) == (16, 16, 16, 16)
    m1, m2, n1, n2 = choose_factors(512, 784)
    assert m1 * m2 == 512 and n1 * n2 == 784 and {n1, n2} == {28}
    layer = KronLinear.from_original(nn.Linear(12, 8), rank=1, factors={"out": (2, 4), "in": (3, 4)})
    assert layer.factors == (2, 4, 3, 4)
    with pytest.raises(Decline, match="do not fit"):
        KronLinear.from_original(nn.Linear(12, 8), rank=1, factors={"out": (3, 3), "in": (3, 4)})


def test_rank_is_the_largest_within_both_budgets_and_guards_decline():
    linear = nn.Linear(256, 256)
    layer = KronLinear.from_original(linear, compression=8, max_flops_ratio=None)
    dense = 256 * 256
    assert dense / (layer.rank * 512) >= 8 and dense / ((layer.rank + 1) * 512) < 8  # params budget binds
    shape = torch.Size([4, 256])
    layer = KronLinear.from_original(linear, compression=8, max_flops_ratio=0.5)  # FLOPs budget binds
    one = KronLinear.from_original(linear, rank=1).flops(shape)
    assert layer.flops(shape) <= 0.5 * 2 * 4 * dense < layer.flops(shape) + one
    with pytest.raises(Decline, match="rank 16 costs 2.00× the dense FLOPs"):
        KronLinear.from_original(linear, rank=16, max_flops_ratio=1.0)
    with pytest.raises(Decline, match="rank 1 already costs"):
        KronLinear.from_original(linear, max_flops_ratio=0.01)
    with pytest.raises(Decline, match="compresses only"):
        KronLinear.from_original(nn.Linear(6, 4), compression=8)
    with pytest.raises(Decline, match="grouped"):
        KronConv.from_original(nn.Conv2d(8, 8, 3, groups=2), rank=1)


def test_shipped_rule_params_shrink_large_layers_at_least_8x_and_halve_flops():
    from fxopt import rules

    (linear_rule, conv_rule) = rules.load("kron").rules
    spec = get("kron")
    for module, rule in ((nn.Linear(512, 512), linear_rule), (nn.Linear(784, 512), linear_rule),
                         (nn.Linear(4096, 1024), linear_rule), (nn.Conv2d(64, 128, 3), conv_rule)):
        sub = spec.build(module, rule.param_dict)
        w_before, w_after = module.weight.numel(), sub.A.numel() + sub.B.numel()
        assert w_before / w_after >= 8
        shape = torch.Size([4, 64, 8, 8]) if isinstance(module, nn.Conv2d) else torch.Size([4, module.in_features])
        out = torch.Size([4, 128, 6, 6]) if isinstance(module, nn.Conv2d) else None
        dense = 2 * (4 * 128 * 36 * 64 * 9 if out else 4 * module.in_features * module.out_features)
        assert sub.flops(shape, out) <= 0.5 * dense


def test_gradients_reach_the_factors():
    torch.manual_seed(0)
    layer = KronLinear.from_original(nn.Linear(12, 6), rank=2).double()
    x = torch.randn(3, 12, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,))
    layer(x).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in (layer.A, layer.B, layer.bias))
    conv = KronConv.from_original(nn.Conv2d(4, 6, 3, padding=1), rank=2).double()
    img = torch.randn(2, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(conv, (img,))


def test_flops_count_the_two_gemms():
    layer = KronLinear.from_original(nn.Linear(64, 32), rank=3)
    m1, m2, n1, n2 = layer.factors
    assert layer.flops(torch.Size([10, 64])) == 2 * 10 * 3 * (m1 * n1 * n2 + m1 * n2 * m2)
    conv = KronConv.from_original(nn.Conv2d(16, 8, 3, padding=1), rank=2)
    m1, m2, n1, n2 = conv.factors
    # small conv on each of the n1 groups (n2 → R·m2 channels, 9 taps), then mixing with A
    assert conv.flops(torch.Size([2, 16, 5, 5]), torch.Size([2, 8, 5, 5])) == 2 * 2 * 25 * 2 * (n1 * m2 * n2 * 9 + m2 * n1 * m1)


# --- the fused kernel (fxopt::kron_linear): Triton (interpreter on CPU) against the torch reference ---

from fxopt.codegen import epilogue as ep  # noqa: E402
from fxopt.codegen import registry  # noqa: E402
from fxopt.codegen.kron import kron_linear, kron_linear_reference  # noqa: E402

from conftest import DEVICE, gpu_only, needs_triton  # noqa: E402


def _factors(r, m1, m2, n1, n2, seed=0, dtype=torch.float32, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(r, m1, n1, generator=g) / math.sqrt(n1)
    b = torch.randn(r, m2, n2, generator=g) / math.sqrt(n2)
    bias = torch.randn(m1 * m2, generator=g)
    return (t.to(device, dtype) for t in (a, b, bias))


@needs_triton
@pytest.mark.parametrize("r,m1,m2,n1,n2", [
    (1, 4, 8, 6, 5),       # every dimension below one 16-wide tile
    (3, 20, 17, 33, 18),   # several tiles on each side, masked tails everywhere
    (2, 16, 16, 16, 16),   # exactly one tile
    (1, 1, 7, 1, 9),       # a 1 × n factor
])
@pytest.mark.parametrize("rows", [1, 3])  # the interpreter runs 2 rows per program: 3 leaves a dead one
@pytest.mark.parametrize("with_bias", [True, False])
def test_kernel_matches_the_reference(r, m1, m2, n1, n2, rows, with_bias):
    a, b, bias = _factors(r, m1, m2, n1, n2, seed=r + m1 + n2)
    bias = bias if with_bias else None
    x = torch.randn(rows, 2, n1 * n2, device=DEVICE)  # leading dims are kept
    ref = kron_linear_reference(x, a, b, bias, [], ())
    with registry.use_backend("triton"):
        out = kron_linear(x, a, b, bias, [], "")
    assert out.shape == (rows, 2, m1 * m2)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ref, F.linear(x, kron_sum(a, b), bias), rtol=1e-5, atol=1e-5)


CHAINS = [
    [["relu"]],
    [["gelu"], ["mul", 0.5]],
    [["silu"], ["add", 0]],                      # residual of the output's shape
    [["sigmoid"], ["rsub", 1.0], ["div", 0]],    # 1 − σ(y), divided by a per-channel vector
    [["tanh"], ["clamp", -0.5, None], ["add", 1.0], ["rdiv", 2.0]],  # denominator ≥ 0.5
    [["mul", 0], ["sub", 1], ["clamp", None, 0.25], ["add", 0]],  # one extra read twice
]


def _extras(chain, shape):
    """Extra tensors for a chain: 0 → the output's shape, 1 → a per-channel vector (both > 0.5)."""
    n = ep.extras_used(ep.check(chain))
    return [torch.rand(shape if i == 0 else shape[-1:], device=DEVICE) + 0.5 for i in range(n)]


@needs_triton
@pytest.mark.parametrize("chain", CHAINS, ids=lambda c: "-".join(s[0] for s in c))
def test_generated_epilogues_match_the_torch_chain(chain):
    a, b, bias = _factors(2, 6, 5, 7, 3, seed=len(chain))
    x = torch.randn(3, 21, device=DEVICE)
    extras = _extras(chain, (3, 30))
    steps = ep.check(chain)
    ref = kron_linear_reference(x, a, b, bias, extras, steps)
    with registry.use_backend("triton"):
        out = kron_linear(x, a, b, bias, extras, ep.encode(chain))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("chain", [[], [["gelu"], ["mul", 0], ["add", 1]]], ids=["plain", "epilogue"])
def test_op_gradients_and_opcheck(backend, chain):
    # float64 for the finite-difference check of the GEMM composition; the kernels take fp32
    dtype = torch.double if backend == "torch" else torch.float32
    a, b, bias = (t.to(dtype).requires_grad_() for t in _factors(2, 3, 4, 5, 2, seed=3, device="cpu"))
    x = torch.randn(4, 10, dtype=dtype, requires_grad=True)
    extras = [torch.rand(4, 12, dtype=dtype, requires_grad=True) + 0.5,
              torch.rand(12, dtype=dtype, requires_grad=True)][:ep.extras_used(ep.check(chain))]
    leaves = [x, a, b, bias, *extras]
    with registry.use_backend(backend):
        if backend == "torch":  # the autograd formula against finite differences
            assert torch.autograd.gradcheck(lambda *t: kron_linear(*t[:4], list(t[4:]), ep.encode(chain)), leaves)
        out = kron_linear(x, a, b, bias, extras, ep.encode(chain))
        grads = torch.autograd.grad(out, leaves, torch.ones_like(out))
        torch.library.opcheck(kron_linear, ([t.detach().float() for t in leaves[:4]] +
                                            [[e.detach().float() for e in extras], ep.encode(chain)]))
    expected = torch.autograd.grad(ep.apply(F.linear(x, kron_sum(a, b), bias), ep.check(chain), extras),
                                   leaves, torch.ones_like(out))
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_op_rejects_an_epilogue_reading_missing_extras():
    a, b, bias = _factors(1, 2, 2, 2, 2, device="cpu")
    with pytest.raises(ValueError, match="reads 1 extras, got 0"):
        kron_linear(torch.randn(1, 4), a, b, bias, [], ep.encode([["add", 0]]))


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_layer_compiles_whole_and_exports(backend):
    """Where the kernel runs, the op is what torch.compile and torch.export see; elsewhere the
    plain GEMMs, which Inductor can fuse with what follows."""
    layer = KronLinear.from_original(nn.Linear(64, 32), rank=2)
    x = torch.randn(3, 64)
    with registry.use_backend(backend):
        compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
        torch.testing.assert_close(compiled(x), layer(x))
        program = torch.export.export(layer, (x,))
        torch.testing.assert_close(program.module()(x), layer(x))
    has_op = any(n.target is torch.ops.fxopt.kron_linear.default for n in program.graph.nodes)
    assert has_op == (backend == "triton")


@gpu_only
@pytest.mark.parametrize("rows", [1, 256, 8192])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_kernel_real_sizes_on_gpu(rows, dtype):
    a, b, bias = _factors(2, 64, 64, 64, 64, seed=11, dtype=dtype, device="cuda")
    x = torch.randn(rows, 4096, device="cuda", dtype=dtype)
    extras = [torch.randn(rows, 4096, device="cuda", dtype=dtype)]
    chain = [["gelu"], ["add", 0]]
    ref = kron_linear_reference(x.float(), a.float(), b.float(), bias.float(), [extras[0].float()], ep.check(chain))
    with registry.use_backend("triton"):
        out = kron_linear(x, a, b, bias, extras, ep.encode(chain))
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol * ref.abs().max().item())


# --- the CPU path: row chunks when the intermediate would leave the cache ---------------------------

from fxopt.codegen import kron as kron_codegen  # noqa: E402


@pytest.mark.parametrize("rows", [1, 5, 16, 37, 64])  # chunks of 8 rows: one pass, tails, exact multiples
@pytest.mark.parametrize("chain", [[], [["gelu"], ["add", 0]]], ids=["plain", "epilogue"])
@pytest.mark.parametrize("bias_kind", ["same", "none", "float64"])
@pytest.mark.parametrize("recorded", [True, False], ids=["autograd", "no_grad"])
def test_cpu_path_in_chunks_matches_the_reference(monkeypatch, rows, chain, bias_kind, recorded):
    # recorded by autograd: chunks concatenated; under no_grad: chunks written into one output (out=)
    a, b, bias = _factors(3, 4, 5, 6, 7, seed=rows, device="cpu")
    bias = {"same": bias, "none": None, "float64": bias.double()}[bias_kind]
    per_row = 3 * 4 * 7  # R·m1·n2
    monkeypatch.setattr(kron_codegen, "CHUNK_ABOVE", 16 * per_row)
    monkeypatch.setattr(kron_codegen, "CHUNK_TARGET", 8 * per_row)
    into_one = []
    real = kron_codegen._rows_into_one_output
    monkeypatch.setattr(kron_codegen, "_rows_into_one_output", lambda *args: into_one.append(1) or real(*args))
    x = torch.randn(rows, 42, requires_grad=recorded)
    extras = [torch.randn(rows, 20)][:ep.extras_used(ep.check(chain))]
    assert kron_codegen.row_chunk(rows, per_row) == (None if rows <= 16 else 8)
    with torch.set_grad_enabled(recorded):
        out = kron_codegen.kron_linear_torch(x, a, b, bias, extras, ep.check(chain))
    assert bool(into_one) == (not recorded and rows > 16)
    ref = kron_linear_reference(x, a, b, bias, extras, ep.check(chain))
    assert out.dtype == ref.dtype
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    if not recorded:
        return
    (g,) = torch.autograd.grad(out.sum(), x)
    (g_ref,) = torch.autograd.grad(ref.sum(), x)
    torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rank", [1, 3])
@pytest.mark.parametrize("lead", [(1,), (1, 1), ()], ids=["batch1", "batch1-seq1", "unbatched"])
@pytest.mark.parametrize("bias_kind", ["same", "none", "float64"])
def test_one_row_path_matches_the_reference(rank, lead, bias_kind):
    # a single row takes two plain GEMMs with the bias inside the second (addmm): the batch-1 case
    a, b, bias = _factors(rank, 5, 4, 7, 6, seed=rank, device="cpu")
    bias = {"same": bias, "none": None, "float64": bias.double()}[bias_kind]
    x = torch.randn(*lead, 42, requires_grad=True)
    for chain in ([], [["gelu"], ["mul", 0.5]]):
        out = kron_codegen.kron_linear_torch(x, a, b, bias, [], ep.check(chain))
        ref = kron_linear_reference(x, a, b, bias, [], ep.check(chain))
        assert out.shape == ref.shape == (*lead, 20) and out.dtype == ref.dtype
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        (g,) = torch.autograd.grad(out.sum(), x)
        (g_ref,) = torch.autograd.grad(ref.sum(), x)
        torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-5)


def test_large_calls_are_chunked_at_the_shipped_thresholds():
    # 4096×4096 with 64×64 factors at rank 4: 16,384 floats of intermediate per row
    assert kron_codegen.row_chunk(64, 4 * 64 * 64) is None  # 1 M floats: one pass
    assert kron_codegen.row_chunk(256, 4 * 64 * 64) == 32  # chunks of 512 K floats (2 MB)
    assert kron_codegen.row_chunk(1024, 4 * 64 * 64) == 32
    assert kron_codegen.row_chunk(256, 64 * 64) is None
    assert kron_codegen.row_chunk(1024, 64 * 64) == 128


# --- mixed factor shapes (Zhou et al. §3.3) -------------------------------------------------------

from fxopt import rules as rules_mod  # noqa: E402
from fxopt.errors import RuleError  # noqa: E402
from fxopt.substitutes.kron import MixedKronLinear  # noqa: E402

MIX = ({"out": (4, 6), "in": (6, 4), "rank": 1}, {"out": (6, 4), "in": (3, 8), "rank": 1})


def _two_shape_weight(seed=0):
    g = torch.Generator().manual_seed(seed)
    first = torch.kron(torch.randn(4, 6, generator=g), torch.randn(6, 4, generator=g))
    second = torch.kron(torch.randn(6, 3, generator=g), torch.randn(4, 8, generator=g))
    return first + second  # 24 × 24, a sum of products of two different shapes


def test_a_mixture_recovers_a_weight_one_shape_cannot():
    linear = nn.Linear(24, 24)
    with torch.no_grad():
        linear.weight.copy_(_two_shape_weight())
    mixed = MixedKronLinear.from_original(linear, MIX)
    assert mixed.reconstruction_error < 1e-5
    torch.testing.assert_close(mixed.dense_weight(), linear.weight, rtol=1e-4, atol=1e-4)
    x = torch.randn(5, 24)
    torch.testing.assert_close(mixed(x), linear(x), rtol=1e-4, atol=1e-4)
    for shape in MIX:  # either shape alone, even at twice the rank, leaves an error
        alone = KronLinear.from_original(linear, rank=2, factors={"out": shape["out"], "in": shape["in"]})
        assert alone.reconstruction_error > 0.05


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**16), r1=st.integers(1, 3), r2=st.integers(1, 3))
def test_a_mixture_never_has_a_larger_error_than_its_first_shape_alone(seed, r1, r2):
    torch.manual_seed(seed)
    linear = nn.Linear(24, 24)
    groups = ({**MIX[0], "rank": r1}, {**MIX[1], "rank": r2})
    mixed = MixedKronLinear.from_original(linear, groups)
    first = KronLinear.from_original(linear, rank=r1, factors={"out": MIX[0]["out"], "in": MIX[0]["in"]})
    assert mixed.reconstruction_error <= first.reconstruction_error + 1e-9
    w = linear.weight.detach().double()
    actual = ((w - mixed.dense_weight().double()).norm() / w.norm()).item()
    assert mixed.reconstruction_error == pytest.approx(actual, abs=1e-6)
    assert mixed.flops(torch.Size([3, 24])) == sum(g.flops(torch.Size([3, 24])) for g in mixed.groups)


def test_mixed_shapes_through_a_rule_file_and_its_errors():
    text = ("version: 1\nrules:\n  - substitute: kron\n    params:\n      max_flops_ratio: null\n      factors:\n"
            "        - {out: [4, 6], in: [6, 4], rank: 1}\n        - {out: [6, 4], in: [3, 8], rank: 1}\n")
    ruleset = rules_mod.parse(text, "mix.yaml")
    linear = nn.Linear(24, 24)
    with torch.no_grad():
        linear.weight.copy_(_two_shape_weight(1))
    sub = get("kron").build(linear, ruleset.rules[0].param_dict)
    assert isinstance(sub, MixedKronLinear) and sub.reconstruction_error < 1e-5
    with pytest.raises(RuleError, match=r"mix.yaml:7:9: params.factors: factors\[0\]: each shape of a mixture needs its rank"):
        rules_mod.parse(text.replace(", rank: 1}\n        - {out: [6, 4]", "}\n        - {out: [6, 4]"), "mix.yaml")
    with pytest.raises(RuleError, match="each shape carries its own rank"):
        rules_mod.parse(text.replace("max_flops_ratio: null", "rank: 2"), "mix.yaml")
    with pytest.raises(Decline, match="do not fit a 24×24 weight"):
        get("kron").build(nn.Linear(24, 24), {**ruleset.rules[0].param_dict,
                                              "factors": ({"out": (5, 5), "in": (6, 4), "rank": 1},)})
    with pytest.raises(Decline, match="linear layers only"):
        get("kron").build(nn.Conv2d(8, 8, 3), ruleset.rules[0].param_dict)
