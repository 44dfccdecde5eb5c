"""The CPU path of the 1-bit linear (codegen/binary_cpu.py): each route (the compiled loop over
packed bits, exact int8 planes, the fp32 copy) against a float64 reference at every batch size it
may be chosen for (the stacked and the one-after-another GEMMs, tails of K and N), opt-in int8 activations within their quantization bound in the layer, the op, the
pipeline and the saved program, and the prepacked weight built once per weight."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxopt
from fxopt import rules
from fxopt.codegen import binary_cpu, native, registry
from fxopt.codegen import epilogue as ep
from fxopt.codegen.binary import binary_linear, binary_linear_reference
from fxopt.codegen.binary_cpu import Finish
from fxopt.substitutes.binary import BinaryLinear, PackedBinaryLinear

pytestmark = pytest.mark.skipif(not binary_cpu.available(), reason="this torch build has no oneDNN quantized linear")
EPS = torch.finfo(torch.float32).eps
BATCHES = [1, 2, 3, 16, 17, binary_cpu.STACK_ROWS, binary_cpu.STACK_ROWS + 1, 200]


def packed(n, k, ternary=False, bias=True, seed=0, activations="exact") -> PackedBinaryLinear:
    torch.manual_seed(seed)
    layer = BinaryLinear.from_original(nn.Linear(k, n, bias=bias), mode="ternary" if ternary else "binary",
                                       activations=activations)
    return layer.packed()


def exact_reference(p: PackedBinaryLinear, x: torch.Tensor) -> torch.Tensor:
    w = p.dense_weight().double()
    return F.linear(x.double(), w, None if p.bias is None else p.bias.double())


def rounding(p: PackedBinaryLinear, x: torch.Tensor) -> torch.Tensor:
    """A few fp32 roundings of the magnitudes involved (summing planes, scaling, bias)."""
    mags = F.linear(x.abs().double(), p.dense_weight().abs().double(), None if p.bias is None else p.bias.abs().double())
    return 8 * EPS * mags


def without_native(monkeypatch) -> None:
    """The bits route by Inductor's compiled loop, as where the AVX-512 kernel cannot run."""
    monkeypatch.setattr(native, "bits_product", lambda: None)


@pytest.mark.parametrize("route, m", [(r, m) for r in binary_cpu.ROUTES for m in BATCHES
                                      if r != "bits" or m <= binary_cpu.BITS_ROWS or native.bits_product()]
                         + [("bits-inductor", m) for m in (1, 3, binary_cpu.BITS_ROWS)])
@pytest.mark.parametrize("n,k,ternary", [(37, 45, False), (64, 96, True), (300, 513, False), (33, 700, True)])
def test_exact_path_is_within_its_bound_at_every_batch_size(route, m, n, k, ternary, monkeypatch):
    """Every route the timed choice may take, at every batch size it may take it for: `bits` up to
    BITS_ROWS rows (K's tail in a part-filled word; the AVX-512 kernel where it runs, and Inductor's
    loop), the int8 GEMM stacked and one plane after another, the fp32 copy."""
    if route == "bits-inductor":
        route = "bits"
        without_native(monkeypatch)
    p = packed(n, k, ternary, seed=m + n)
    x = torch.randn(m, k) * 3
    x[0, :5] = 0  # zeros and a large outlier in a row
    x[-1, 7] = 1e3
    with registry.use_backend("auto"), binary_cpu.forced_route(route):
        y = p(x)
        assert registry.pick(x, None, binary_linear_reference, binary_cpu.binary_linear_cpu) is binary_cpu.binary_linear_cpu
        err = (y.double() - exact_reference(p, x)).abs()
        # int8 planes: the planes' residual, coarser in the outlier's row; bits and dense: fp32 rounding only
        bound = (binary_cpu.exact_error_bound(x, p.scale).double() if route == "int8" else 0) + rounding(p, x)
        assert (err <= bound).all(), (err / bound).max()
        # without an outlier, as close as the dense fp32 layer itself
        x = torch.randn(m, k)
        err = (p(x).double() - exact_reference(p, x)).abs().max()
    assert err <= 4 * (F.linear(x, p.dense_weight(), p.bias).double() - exact_reference(p, x)).abs().max() + 1e-6


@pytest.mark.parametrize("route, m", [("bits", 4), ("bits-inductor", 4), ("int8", 4), ("int8", 80), ("dense", 4)])
@pytest.mark.parametrize("ternary", [False, True])
@pytest.mark.parametrize("activations", ["exact", "int8"])
def test_inputs_that_are_not_finite_give_what_the_dense_layer_gives(route, m, ternary, activations, monkeypatch):
    # an inf or a NaN has no int8 planes and turns the bits loop's ±inf into NaN: such rows must
    # come out as an fp32 layer computes them (±inf of the right sign, NaN), never finite numbers
    if route == "bits-inductor":
        route = "bits"
        without_native(monkeypatch)
    p = packed(24, 40, ternary, seed=m, activations=activations)
    x = torch.randn(m, 40)
    x[1, 3], x[2, 5], x[3, 0] = float("inf"), float("-inf"), float("nan")
    with binary_cpu.forced_route(route):
        y = p(x)
    dense = F.linear(x, p.dense_weight(), p.bias)
    torch.testing.assert_close(y[1:4], dense[1:4], equal_nan=True)
    assert torch.isfinite(y[0]).all() and torch.isfinite(y[4:]).all()
    torch.testing.assert_close(y[0], p(x[:1])[0])  # the finite rows as without the others


def test_the_bits_route_is_compiled_once_per_shape_and_runs_inside_torch_compile(monkeypatch):
    without_native(monkeypatch)
    p = packed(70, 100, ternary=True, seed=8)
    x = torch.randn(2, 100)
    with binary_cpu.forced_route("bits"):
        y = p(x)
        kernels = dict(binary_cpu._kernels)
        assert (2, 70, 7, 2, torch.get_num_threads()) in kernels  # 100 ternary columns: 7 words of 2-bit codes
        torch.testing.assert_close(p(torch.randn(2, 100)).shape, y.shape)
        assert binary_cpu._kernels == kernels  # not compiled again
        torch.testing.assert_close(torch.compile(p, fullgraph=True)(x), y)
        p(torch.randn(binary_cpu.BITS_ROWS + 1, 100))  # past BITS_ROWS: the int8 GEMM, nothing compiled
        assert binary_cpu._kernels == kernels
    w = p.dense_weight() / p.scale[:, None]
    codes = binary_cpu.ternary_codes(p.signs, p.mask, 100)
    fields = (codes.unsqueeze(-1) >> torch.arange(0, 32, 2, dtype=torch.int32)) & 3
    assert torch.equal(fields.reshape(70, -1)[:, :100] - 1, w.round().int())  # W + 1 in 2-bit fields, in order
    torch.testing.assert_close(binary_cpu.bits_product(F.pad(x, (0, 12)), codes, 2), x @ w.t(), rtol=1e-5, atol=1e-5)
    b = packed(70, 100, seed=8)
    torch.testing.assert_close(binary_cpu.bits_product(F.pad(x, (0, 28)), b.signs, 1),
                               x @ (b.dense_weight() / b.scale[:, None]).t(), rtol=1e-5, atol=1e-5)


needs_native = pytest.mark.skipif(native.bits_product() is None, reason="no AVX-512 or no C compiler here")


@needs_native
@pytest.mark.parametrize("m", [1, 2, 5, 67])  # rows in groups of 4 and a tail; past 64, row sums on the heap
@pytest.mark.parametrize("n,k", [(1, 32), (37, 45), (70, 100), (64, 4 * 32 + 7), (129, 1000)])
@pytest.mark.parametrize("ternary", [False, True])
@pytest.mark.parametrize("threads", [1, 2])
def test_the_avx512_kernel_is_the_papers_sum_of_signed_inputs(m, n, k, ternary, threads):
    """Binary x·Wᵀ = 2·Σ_{bit set} x − Σ x, ternary Σ_{mask ∧ sign} x − Σ_{mask ∧ ¬sign} x, read
    from the packed words: against float64 at every row count a call takes, words in groups of four
    and a remainder, K's tail in a part-filled word, one and two threads; bare, and finished in the
    kernel as (x·Wᵀ)⊙α + b, with or without a bias; a row holding an inf or a NaN is reported."""
    p = packed(n, k, ternary, seed=m + n + k)
    x = torch.randn(m, k) * 2
    kernel, width = binary_cpu._bits_kernel(x, p.signs, p.mask, k)
    assert width == p.signs.shape[1] * 32
    padded = F.pad(x, (0, width - k))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        finishes = [None, Finish(p.scale, None), Finish(p.scale, p.bias), Finish(p.scale, p.bias, 0.0),
                    Finish(p.scale, None, -0.5, 0.25)]
        runs = [kernel(padded, x, finish) for finish in finishes]
        bad = padded.clone()
        bad[m // 2, k - 1] = float("nan" if m % 2 else "inf")
        suspect = kernel(bad, bad, Finish(p.scale, p.bias))[1]
    finally:
        torch.set_num_threads(before)
    products = x.double() @ (p.dense_weight().double() / p.scale.double()[:, None]).t()
    bound = 4 * EPS * x.abs().double().sum(-1, keepdim=True) + 1e-30
    scale, bias = p.scale.double(), p.bias.double()
    wants = [products, products * scale, products * scale + bias, (products * scale + bias).clamp(0),
             (products * scale).clamp(-0.5, 0.25)]
    slacks = [bound] + [bound * scale.abs() + EPS * bias.abs()] * 4
    for (got, flagged), want, slack in zip(runs, wants, slacks):
        assert not flagged
        assert ((got.double() - want).abs() <= slack).all()
    assert suspect


def test_the_native_kernel_is_built_once_into_its_cache_and_missing_compilers_fall_back(tmp_path, monkeypatch):
    if native._compiler() is None:
        pytest.skip("no C compiler")
    monkeypatch.setenv("FXOPT_CACHE_DIR", str(tmp_path))
    source = tmp_path / "k.c"
    source.write_text("int fxopt_answer(void) { return 42; }\n")
    built = native.build(source, ["-O2", "-shared", "-fPIC"])
    assert built.parent == tmp_path and sorted(p.name for p in tmp_path.iterdir()) == sorted(["k.c", built.name])
    stamp = built.stat().st_mtime_ns
    assert native.build(source, ["-O2", "-shared", "-fPIC"]) == built and built.stat().st_mtime_ns == stamp
    import ctypes
    assert ctypes.CDLL(str(built)).fxopt_answer() == 42
    source.write_text("this is not C\n")  # a failed build leaves nothing behind and raises
    with pytest.raises(Exception) as info:
        native.build(source, ["-O2", "-shared", "-fPIC"])
    assert isinstance(info.value, (OSError, native.subprocess.SubprocessError))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["k.c", built.name])
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    native.bits_product.cache_clear()
    try:
        assert native.bits_product() is None  # the layer then takes Inductor's loop
        monkeypatch.delenv("CC")
        monkeypatch.setenv("FXOPT_NATIVE", "0")
        native.bits_product.cache_clear()
        assert native.bits_product() is None
    finally:
        native.bits_product.cache_clear()


def test_a_derived_form_is_kept_only_while_a_route_uses_it(monkeypatch):
    p = packed(40, 64, seed=9)
    chosen = iter(["int8", "bits", "dense"])
    monkeypatch.setattr(binary_cpu, "_fastest", lambda *a: next(chosen))
    p(torch.randn(16, 64))  # bucket 16: the int8 GEMM
    assert p.signs in binary_cpu._prepacked
    p(torch.randn(1, 64))  # bucket 1: bits; the int8 form stays for bucket 16
    assert p.signs in binary_cpu._prepacked and p.signs not in binary_cpu._dense
    with torch.no_grad():
        p.signs[0, 0] = ~p.signs[0, 0]  # new bits: every bucket chooses again, old forms go
    p(torch.randn(1, 64))  # bucket 1, now dense: the int8 form is no longer used by any route
    assert list(binary_cpu._route[p.signs].values()) == ["dense"]
    assert p.signs not in binary_cpu._prepacked and p.signs in binary_cpu._dense


def test_exact_path_keeps_leading_dims_zero_rows_dtypes_and_epilogues():
    p = packed(21, 45, seed=3)
    x = torch.randn(2, 5, 45)
    chain = [["gelu"], ["mul", 0], ["add", 1]]
    extras = [torch.rand(2, 5, 21) + 0.5, torch.rand(21)]
    got = binary_linear(x, p.signs, p.scale, p.bias, p.mask, 45, extras, ep.encode(chain), "exact")
    want = ep.apply(F.linear(x, p.dense_weight(), p.bias), ep.check(chain), extras)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert p(torch.zeros(0, 45)).shape == (0, 21) and p(torch.zeros(3, 45)).abs().max() == p.bias.abs().max()
    half = p(x.bfloat16())
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), F.linear(x.bfloat16().float(), p.dense_weight(), p.bias), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("route", ["bits", "bits-inductor", "int8", "dense"])
@pytest.mark.parametrize("chain", [[["relu"]], [["clamp", -0.5, None], ["mul", 2.0]], [["clamp", None, 0.25]],
                                   [["clamp", 0.3, -0.2]], [["gelu"], ["clamp", 0.0, 1.0]]],
                         ids=["relu", "clamp-low-then-mul", "clamp-high", "crossed-bounds", "gelu-first"])
def test_a_leading_relu_or_clamp_is_applied_by_every_route_as_torch_does(route, chain, monkeypatch):
    # folded into each route's finish (the AVX-512 kernel: in registers); NaN rows stay NaN
    if route == "bits-inductor":
        route = "bits"
        without_native(monkeypatch)
    p = packed(37, 45, seed=9)
    x = torch.randn(5, 45) * 3
    x[2, 4] = float("nan")
    with binary_cpu.forced_route(route):
        got = binary_linear(x, p.signs, p.scale, p.bias, p.mask, 45, [], ep.encode(chain), "exact")
    want = ep.apply(F.linear(x.double(), p.dense_weight().double(), p.bias.double()), ep.check(chain), [])
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5, equal_nan=True)
    assert got[2].isnan().all()


def test_backend_torch_runs_the_reference():
    p = packed(16, 40, seed=4)
    x = torch.randn(5, 40)
    with registry.use_backend("torch"):
        assert torch.equal(p(x), binary_linear_reference(x, p.signs, p.scale, p.bias, None, 40, [], ()))


def test_the_prepacked_weight_is_built_once_and_again_when_the_bits_change():
    p = packed(16, 40, seed=5)
    x = torch.randn(3, 40)
    with binary_cpu.forced_route("int8"):
        p(x)
        first = binary_cpu._prepacked[p.signs]
        p(x)
        assert binary_cpu._prepacked[p.signs] is first  # no unpacking on the second call
        with torch.no_grad():
            p.signs[0, 0] = ~p.signs[0, 0]  # a trained or edited layer: the cache sees the new version
        torch.testing.assert_close(p(x), F.linear(x, p.dense_weight(), p.bias), rtol=1e-5, atol=1e-5)
        assert binary_cpu._prepacked[p.signs] is not first


@pytest.mark.parametrize("m", [1, 17, 200])
@pytest.mark.parametrize("ternary", [False, True])
def test_int8_activations_stay_within_the_quantization_bound(m, ternary):
    p = packed(48, 300, ternary, seed=m, activations="int8")
    x = torch.randn(m, 300)
    exact = exact_reference(p, x)
    with registry.use_backend("torch"):
        want = p(x)
    for route in binary_cpu.ROUTES:
        with binary_cpu.forced_route(route):
            y = p(x).double()
        err = (y - exact).abs()
        assert (err <= binary_cpu.int8_error_bound(x, p.scale).double() + rounding(p, x)).all()
        assert err.max() > 1e-4  # it does quantize: int8 is not the exact path under another name
        # every route and implementation computes the same thing: the reference on the fake-quantized input
        torch.testing.assert_close(y.float(), want, rtol=1e-5, atol=1e-4)


def test_int8_bound_follows_from_the_quantization_step():
    x = torch.randn(7, 90) * 5
    q = binary_cpu.fake_quantize(x)
    s = binary_cpu.row_scale(x)
    (plane,), same = binary_cpu.planes(x, 1)
    assert torch.equal(same, s) and torch.equal(q, plane.float() * s)  # the int8 GEMM's one plane, in floats
    assert torch.equal(binary_cpu.fake_quantize(x.view(1, 7, 90).double()), q.view(1, 7, 90).double())  # leading dims
    assert ((x - q).abs() <= s / 2).all() and ((q / s) == (q / s).round()).all() and (q / s).abs().max() <= 127
    assert ((x.abs().amax(-1, keepdim=True) / s) > 63.5).all()  # the step is as fine as int8 allows
    planes, s = binary_cpu.planes(x, 3)
    back = s.double() * (planes[0].double() + planes[1].double() / 254 + planes[2].double() / 254 ** 2)
    assert ((x.double() - back).abs() <= s.double() * 0.5 / 254 ** 2 * (1 + 1e-4)).all()


def test_the_training_form_quantizes_as_the_packed_form_does():
    torch.manual_seed(6)
    layer = BinaryLinear.from_original(nn.Linear(64, 32), activations="int8").eval()
    x = torch.randn(9, 64, requires_grad=True)
    y = layer(x)
    torch.testing.assert_close(y, layer.packed()(x.detach()), rtol=1e-5, atol=1e-4)
    y.sum().backward()  # straight-through: the gradient of the unquantized input
    torch.testing.assert_close(x.grad, layer.quantized_weight().detach().sum(0).expand(9, -1))


def test_a_rule_asks_for_int8_activations_and_the_report_measures_them(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10)).eval()
    x = torch.randn(16, 64)

    def run(activations):
        rs = rules.parse(f"version: 1\nrules:\n  - {{substitute: binary, params: {{activations: {activations}}}}}\n",
                         "b.yaml")
        return fxopt.optimize(model, (x,), rs, time_sites=False)

    exact, int8 = run("exact"), run("int8")
    for e, i in zip(exact.report["sites"], int8.report["sites"]):
        assert i["status"] == "applied" and i["params"]["activations"] == "int8"
        assert i["error"]["rel_l2"] > e["error"]["rel_l2"]  # the quantized input's error is measured per site
        assert "int8 activations" in i["module_after"]
    out = int8.save(tmp_path / "out")
    loaded = fxopt.load(out)
    torch.testing.assert_close(loaded(x), int8.program.module()(x), rtol=1e-5, atol=1e-5)
    state = torch.export.load(out / "model.pt2").state_dict
    signs = [v for k, v in state.items() if k.endswith("signs")]
    assert signs and all(v.dtype == torch.int32 for v in signs)  # still 1 bit per weight on disk
    # and exact at every other site
    torch.testing.assert_close(exact.program.module()(x), exact.model(x), rtol=1e-5, atol=1e-5)


def test_int8_activations_are_declined_for_convolutions():
    rs = rules.parse("version: 1\nrules:\n  - {substitute: binary, params: {activations: int8}}\n", "b.yaml")
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 6 * 6, 4)).eval()
    result = fxopt.optimize(model, (torch.randn(2, 3, 8, 8),), rs, time_sites=False)
    conv = result.report["sites"][0]
    assert conv["status"] == "skipped" and "int8 applies to linear layers" in conv["reason"]
    assert result.report["sites"][1]["status"] == "applied"


def test_a_packed_convolution_unpacks_its_weight_once_and_hands_out_copies():
    from fxopt.codegen import binary as kernel
    from fxopt.substitutes.binary import BinaryConv

    torch.manual_seed(7)
    conv = nn.Conv2d(6, 10, 3, padding=1)
    packed = BinaryConv.from_original(conv, mode="ternary").packed()
    x = torch.randn(2, 6, 9, 9)
    dense = (packed._weight(54, torch.float32) * packed.scale[:, None]).view(10, 6, 3, 3)
    torch.testing.assert_close(packed(x), F.conv2d(x, dense, packed.bias, padding=1), rtol=1e-5, atol=1e-5)
    first = kernel._scaled[packed.signs]
    w = kernel.binary_weight(packed.signs, packed.scale, packed.mask, 54, torch.float32)
    assert kernel._scaled[packed.signs] is first  # not unpacked again
    w.zero_()  # a copy: the next call is unharmed
    torch.testing.assert_close(kernel.binary_weight(packed.signs, packed.scale, packed.mask, 54, torch.float32),
                               dense.view(10, 54))
    with torch.no_grad():
        packed.scale.mul_(2)  # α changed in place: rebuilt
    torch.testing.assert_close(packed(x), F.conv2d(x, 2 * dense, packed.bias, padding=1), rtol=1e-5, atol=1e-5)
    torch.library.opcheck(kernel.binary_weight, (packed.signs, packed.scale, packed.mask, 54, torch.float32))


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("conv, shape", [
    (nn.Conv2d(6, 10, 3, padding=1), (2, 6, 9, 9)),
    (nn.Conv2d(6, 10, 3, stride=2, padding=2, dilation=2), (2, 6, 11, 11)),
    (nn.Conv2d(8, 12, 3, padding="same", groups=4, bias=False), (3, 8, 7, 7)),
    (nn.Conv2d(6, 10, (1, 3), padding="valid"), (6, 5, 9)),  # unbatched input
    (nn.Conv1d(6, 10, 5, padding=2), (2, 6, 17)),
    (nn.Conv2d(6, 10, 4, padding="same"), (2, 6, 9, 9)),  # odd 'same': binary_weight and F.conv
])
def test_a_packed_convolution_runs_on_its_kept_weight_and_gives_gradients_for_its_input(conv, shape):
    """fxopt::binary_conv: the convolution on α ⊙ W kept from the first call, no copy per call;
    the input's (and bias's) gradient through the transposed convolution; opcheck's contract."""
    from fxopt.codegen import binary as kernel
    from fxopt.substitutes.binary import BinaryConv

    torch.manual_seed(3)
    packed = BinaryConv.from_original(conv, mode="ternary").packed()
    w = (packed._weight(packed.shape[1] * math.prod(packed.shape[2:]), torch.float32)
         * packed.scale[:, None]).view(packed.shape)
    dense = type(conv)(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                       dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None)
    with torch.no_grad():
        dense.weight.copy_(w)
        if conv.bias is not None:
            dense.bias.copy_(packed.bias)
    x = torch.randn(shape, requires_grad=True)
    torch.testing.assert_close(packed(x), dense(x), rtol=1e-5, atol=1e-5)
    (gx,) = torch.autograd.grad(packed(x).square().sum(), x)
    (ref,) = torch.autograd.grad(dense(x).square().sum(), x)
    torch.testing.assert_close(gx, ref, rtol=1e-4, atol=1e-4)
    padding = packed._symmetric_padding()
    if padding is not None:
        args = (x.detach(), packed.signs, packed.scale, packed.bias, packed.mask, list(packed.shape),
                list(packed.stride), padding, list(packed.dilation), packed.groups)
        torch.library.opcheck(kernel.binary_conv, args)


def test_eager_inference_skips_the_op_dispatch_and_everything_that_records_sees_the_op():
    from torch.fx.experimental.proxy_tensor import make_fx

    from fxopt.codegen import binary as kernel

    p = packed(24, 40, seed=10)
    x = torch.randn(3, 40)
    direct = kernel._eager_inference_on_cpu
    with torch.no_grad():
        assert direct(x, []) and torch.equal(p(x), binary_linear(x, p.signs, p.scale, p.bias, None, 40, [], "", "exact"))
        with registry.use_backend("torch"):
            assert not direct(x, [])  # the backend asked for is honoured by the op
    assert direct(x, [])  # grad mode on, nothing needs a gradient
    leaf = x.clone().requires_grad_()
    assert not direct(leaf, [])
    p(leaf).sum().backward()  # through the op's autograd
    torch.testing.assert_close(leaf.grad, p.dense_weight().sum(0).expand(3, -1), rtol=1e-5, atol=1e-5)
    graph = make_fx(p)(x).graph
    assert any(n.target is torch.ops.fxopt.binary_linear.default for n in graph.nodes)
    program = torch.export.export(p, (x,))
    assert any(n.target is torch.ops.fxopt.binary_linear.default for n in program.graph.nodes)
    assert not direct(torch.randn(3, 40, dtype=torch.float64).as_subclass(torch.nn.Parameter), [])


@pytest.mark.parametrize("m,k,n", [(1, 8, 8), (5, 4099, 33), (96, 512, 64)])
def test_the_int8_gemm_gives_the_exact_integer_products(m, k, n):
    # rows go to oneDNN as uint8 q + 128 with zero point 128; its compensation must leave the
    # products exact, at the extremes of the planes' range too
    g = torch.Generator().manual_seed(m)
    q = torch.randint(-127, 128, (m, k), generator=g)
    q[0, :3] = torch.tensor([-127, 127, 0])
    w = torch.randint(-1, 2, (n, k), generator=g, dtype=torch.int8)
    packed = (torch.ops.onednn.qlinear_prepack(w, None), torch.ones(n), torch.zeros(n, dtype=torch.int64))
    for rows in (q, torch.full((m, k), -127)):
        out = binary_cpu._gemm((rows + 128).to(torch.uint8), packed)
        assert torch.equal(out.double(), rows.double() @ w.double().T)


@pytest.mark.parametrize("count", [1, 3])
@pytest.mark.parametrize("m,k", [(1, 7), (9, 40), (64, 33)])
def test_unsigned_planes_are_the_planes_shifted_by_128_in_every_chunk(monkeypatch, count, m, k):
    monkeypatch.setattr(binary_cpu, "PLANE_CHUNK", 3 * k)  # chunks of 3 rows: one, several, a tail
    g = torch.Generator().manual_seed(m * k)
    x = torch.randn(m, k, generator=g) * torch.logspace(-4, 4, m).unsqueeze(1)
    x[0] = 0.0  # an all-zero row (scale 1)
    us, s = binary_cpu.unsigned_planes(x, count)
    qs, s_ref = binary_cpu.planes(x, count)
    assert us.dtype == torch.uint8 and us.shape == (count, m, k) and torch.equal(s, s_ref)
    for u, q in zip(us, qs):
        assert torch.equal(u.to(torch.int16) - 128, q.to(torch.int16))


def test_the_timed_choice_leaves_out_an_int8_gemm_that_does_not_pay_on_this_cpu(monkeypatch):
    assert isinstance(binary_cpu.int8_gemm_pays.__wrapped__(), bool)  # the probe runs on this machine
    p = packed(40, 64, seed=11)
    offered = []
    monkeypatch.setattr(binary_cpu, "_fastest", lambda candidates, *a: offered.append(candidates) or candidates[-1])
    monkeypatch.setattr(binary_cpu, "int8_gemm_pays", lambda: False)
    p(torch.randn(1, 64))
    p(torch.randn(32, 64))
    bits = ["bits"] if native.bits_product() else []  # past BITS_ROWS only the AVX-512 kernel's
    assert offered == [["bits", "dense"], bits + ["dense"]]
    monkeypatch.setattr(binary_cpu, "int8_gemm_pays", lambda: True)
    p(torch.randn(64, 64))
    assert offered[-1] == bits + ["int8", "dense"]


def _op_events(module: nn.Module, x: torch.Tensor) -> list[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        module(x)
    return [e.name for e in prof.events() if e.name.startswith("fxopt::binary_")]


def test_a_loaded_program_runs_packed_layers_without_the_op_dispatch_and_still_traces_the_op(tmp_path):
    # an exported program names the op; fxopt.load points those calls at the functions the packed
    # layers call (codegen.registry.call_directly): the op's body in eager inference, the op when traced
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(16 * 8 * 8, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                          nn.Linear(64, 10)).eval()
    x = torch.randn(4, 3, 8, 8)
    result = fxopt.optimize(model, (x,), "binary", time_sites=False)
    loaded = fxopt.load(result.save(tmp_path / "out"))
    targets = {n.target for n in loaded.graph.nodes if n.op == "call_function"}
    assert {"binary_conv_call", "binary_linear_call"} <= {getattr(t, "__name__", "") for t in targets}
    assert not targets & {torch.ops.fxopt.binary_linear.default, torch.ops.fxopt.binary_conv.default}
    plain = result.program.module()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), plain(x), rtol=1e-5, atol=1e-5)  # routes may differ in summation order
        assert _op_events(plain, x) and not _op_events(loaded, x)  # the plain module goes through the op
        torch.testing.assert_close(torch.compile(loaded)(x), plain(x), rtol=1e-5, atol=1e-5)
    # in grad mode too: AOT autograd traces the ops' backward under fake tensors (the unpacking table
    # was once a module-level tensor, which that trace cannot take)
    torch.testing.assert_close(torch.compile(fxopt.load(tmp_path / "out"))(x), plain(x), rtol=1e-5, atol=1e-5)
    exported = torch.export.export(loaded, (x,))
    ops = {n.target for n in exported.graph.nodes if n.op == "call_function"}
    assert {torch.ops.fxopt.binary_linear.default, torch.ops.fxopt.binary_conv.default} <= ops
