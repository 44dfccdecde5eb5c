"""The CPU path of `fxopt::binary_linear`: a loop over the packed words themselves, or ±1 (or
−1/0/+1) weights as a prepacked int8 matrix, the activations as int8 planes (passed as uint8 with
zero point 128), one integer GEMM (oneDNN; AMX or VNNI where the CPU has them), whichever is
faster for the weight and batch size.

`bits`: reading fp32 weights is what a dense layer at small batches waits on, and the packed words
are 1/32 of those bytes. The loop computes x·Wᵀ in fp32 with no quantization: what the reference
computes up to float summation order. Two implementations, the first that runs here:

* AVX-512 (`codegen/native.py`, `bits_avx512.c`), at any batch size: table lookups (as T-MAC does
  for low-bit weights, here in fp32). For each group of 4 columns a row has 16 subset sums, one
  register; the weights of 16 outputs are 16 4-bit indices, and one permute looks them all up, so
  64 weights cost one permute and one add (binary: 2·Σ_{bit set} x − Σ x; ternary: the lookups of
  its +1 plane minus those of its −1 plane, made once from the sign and mask planes, the same 2
  bits per weight). The kernel reads the bits regrouped once per weight (`lut_layout`, the same
  size) and finishes each output itself (`Finish`; it flags rows whose sum is not finite). 4096 ×
  4096 at batch 1: ~0.14 ms on 2 cores, dense fp32 ~3.5 ms; it stays ahead of the int8 GEMM to
  64 rows and more.
* Elsewhere, up to BITS_ROWS rows: an Inductor-compiled kernel (generated C++, SIMD) that walks
  each output's words, turns bit j into 0/1 in registers and sums 2·Σ bit·x − Σ x; ternary reads
  a 2-bit form made once (W + 1 in 2-bit fields) and sums (W + 1)·x − x. Compiled once per shape
  (rows, words, field width, threads) through `torch._inductor.compile` on a `make_fx` graph,
  without Dynamo, so it runs the same inside a caller's `torch.compile` and never meets a
  recompile limit. Its cost grows with the rows, so larger batches take the GEMM.

The packed bits stay what the layer holds and what is saved. On the first call with a given
`signs` tensor (and again only if it changes in place) they are unpacked once to int8 and handed
to oneDNN's `qlinear_prepack`; the prepacked matrix is kept in a table keyed weakly by that
tensor, so it lives as long as the layer does. No call unpacks the matrix after that.

Activations (per row of x; s = a power of two with max|x| / s in (63.5, 127], so x / s is exact):

* `exact` (default): x / s = q₁ + q₂/254 + q₃/254² + r, each qᵢ an int8 plane (round to nearest,
  then the residual times 254), |r| ≤ ½·254⁻². The planes go through the GEMM stacked as rows
  (small batches) or one after another (large ones); their integer products are exact, so
  y = s·(Y₁ + Y₂/254 + Y₃/254²)·α + b differs from x·Wᵀ·α + b by at most
  |α|·K·s·½·254⁻² (K: in_features) plus the float rounding of that sum: per element the input is
  kept to within 2⁻²³ of its row's largest magnitude, finer than fp32's own summation error on
  such dot products (`exact_error_bound`; the tests check it at every batch size).
* `int8` (opt-in, a rule's `activations: int8`): one plane, x ≈ s·round(x / s), so
  |y − exact| ≤ |α|·Σₖ|xₖ − s·qₖ| ≤ |α|·K·s/2 (`int8_error_bound`). The training form and the
  reference fake-quantize the same way, so validation reports this error per site.

Choosing: for each weight and batch-size bucket (powers of two) the first call times the routes
on its own input (interleaved rounds, each route's fastest run) and keeps the fastest: `bits`
(the AVX-512 kernel at any bucket; Inductor's up to BITS_ROWS), the int8 GEMM (where
`int8_gemm_pays` on this CPU), or `F.linear` on an fp32 copy of the ±1 weight unpacked once (small
layers, whose weights sit in cache and where the int8 route's fixed costs of splitting and
combining dominate). With `int8` activations every route computes on the quantized rows, which
keeps the numbers of that setting. A derived form (the int8 matrix, ¼ of fp32; the fp32 copy; the
regrouped bits) is kept only while some bucket's route uses it; the saved file holds 1 bit per
weight either way. `forced_route` pins one route (tests, benchmarks).

Every route ends with `Finish`: scale, bias, and a relu or clamp that starts the fused epilogue.

Only where oneDNN's quantized linear is present (x86 builds of torch); elsewhere the reference runs.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import time
from typing import Any, Callable, Iterator, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils.weak import WeakIdKeyDictionary

from fxopt.bits import WORD, unpack_weight

from . import epilogue as ep
from . import native

ACTIVATIONS = ("exact", "int8")
PLANES = {"exact": 3, "int8": 1}
STEP = 254.0  # each plane refines the one before by this factor (residual ≤ ½ → ≤ 127)
STACK_ROWS = 64  # up to this many rows, the planes of a batch go through one GEMM stacked as rows
BITS_ROWS = 8  # up to this many rows (bucket), Inductor's loop over the packed words is a candidate
ROUTES = ("bits", "int8", "dense")

log = logging.getLogger(__name__)

_prepacked = WeakIdKeyDictionary()  # signs → (state key, prepacked int8 weight, ones, zeros)
_dense = WeakIdKeyDictionary()  # signs → (state key, fp32 ±1 weight), where some bucket chose it
_route = WeakIdKeyDictionary()  # signs → {(state key, activations, bucket): one of ROUTES}
_ternary = WeakIdKeyDictionary()  # signs → (state key, 2-bit codes), for the bits route's Inductor loop
_lut = WeakIdKeyDictionary()  # signs → (state key, the AVX-512 kernel bound to its `lut_layout`s)
_kernels: dict[tuple, Optional[Callable]] = {}  # (rows, out, words, bits, threads) → compiled (None: failed)
_forced: list[str] = []


@functools.cache
def available() -> bool:
    """oneDNN's quantized linear is in this build of torch and runs."""
    try:
        w = torch.ops.onednn.qlinear_prepack(torch.ones(8, 8, dtype=torch.int8), None)
        _gemm(torch.full((1, 8), 129, dtype=torch.uint8), (w, torch.ones(8), torch.zeros(8, dtype=torch.int64)))
        return True
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


@functools.cache
def int8_gemm_pays() -> bool:
    """Is oneDNN's int8 GEMM at least half as fast as fp32's on this machine (32 × 512 × 512, one
    timed run each after a warm-up)? Where oneDNN has no fast kernel for the CPU it falls back to a
    reference loop (int8 rows on a 2-core AMD EPYC VM: 97 ms where fp32 took 0.3 ms, hence
    `_gemm`'s uint8 rows), and timing that at a large layer's batch would take minutes, so there
    the timed choice never tries it (the other routes are exact too)."""
    u = torch.randint(1, 256, (32, 512), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    w = torch.randint(-1, 2, (512, 512), generator=torch.Generator().manual_seed(1), dtype=torch.int8)
    packed = (torch.ops.onednn.qlinear_prepack(w, None), torch.ones(512), torch.zeros(512, dtype=torch.int64))
    x, wf = u.float(), w.float()
    seconds = []
    for run in (lambda: _gemm(u, packed), lambda: F.linear(x, wf)):
        run()
        start = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - start)
    return seconds[0] <= 2 * seconds[1]


def row_scale(x: torch.Tensor) -> torch.Tensor:
    """Per row of a 2-D x, the power of two s with max|x| / s in (63.5, 127] (1 for an all-zero row)."""
    top = x.abs().amax(-1, keepdim=True)
    s = (top / 127.0).log2_().ceil_().exp2_()  # in place: a batch-1 call is a few µs an op
    return s.masked_fill_(~(top > 0), 1.0)


def _nearest(r: torch.Tensor) -> torch.Tensor:
    """r rounded to the nearest integer within int8's ±127 (still floats; a fresh tensor)."""
    return torch.round(r).clamp_(-127, 127)


def planes(x: torch.Tensor, count: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """`count` int8 planes of a 2-D float x and its row scales: x ≈ s·Σᵢ qᵢ·254⁻ⁱ."""
    s = row_scale(x)
    r = x / s  # exact: s is a power of two
    out = []
    for i in range(count):
        q = _nearest(r)
        out.append(q.to(torch.int8))
        if i + 1 < count:
            r = (r - q) * STEP
    return out, s


PLANE_CHUNK = 2**18  # floats of x split at a time by `unsigned_planes` (1 MB: its temporaries stay in cache)


def unsigned_planes(x: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`planes(x, count)` as the int8 route feeds them to oneDNN: one (count, rows, K) uint8 tensor
    of qᵢ + 128, and the row scales. Split in chunks of rows, in place, into the one output: whole
    at batch 1024 × 4096 the temporaries were 16 MB each and the split took 35 ms (13 ms chunked)."""
    s = row_scale(x)
    m, k = x.shape
    out = torch.empty(count, m, k, dtype=torch.uint8)
    rows = max(1, PLANE_CHUNK // max(k, 1))
    for lo in range(0, m, rows):
        r = x[lo:lo + rows] / s[lo:lo + rows]  # exact: s is a power of two
        for i in range(count):
            q = _nearest(r)
            if i + 1 < count:
                r = r.sub_(q).mul_(STEP)
            out[i, lo:lo + rows] = q.add_(128)  # 1 … 255, exact in uint8
    return out, s


def fake_quantize(x: torch.Tensor) -> torch.Tensor:
    """What the `int8` path computes with: each row of x as s·round(x / s), the one plane of
    `planes(x, 1)` times its scale, kept in floats (any leading dims; 24 µs at 1 × 1024 on the
    2-core VM, 40 µs through the int8 plane)."""
    flat = (x if x.dim() == 2 else x.reshape(-1, x.shape[-1])).float()
    s = row_scale(flat)
    q = _nearest(flat / s).mul_(s)  # x / s exact: s is a power of two
    q = q if x.dim() == 2 else q.reshape(x.shape)
    return q if q.dtype == x.dtype else q.to(x.dtype)


def exact_error_bound(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(rows, out) bound on |y_exact_path − x·Wᵀ·α| from the planes' residual (float rounding aside)."""
    flat = x.reshape(-1, x.shape[-1]).float()
    return row_scale(flat) * flat.shape[-1] * 0.5 / STEP ** 2 * scale.abs().float()


def int8_error_bound(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(rows, out) bound on |y_int8_path − x·Wᵀ·α|: |α|·Σₖ|xₖ − s·qₖ| (≤ |α|·K·s/2)."""
    flat = x.reshape(-1, x.shape[-1]).float()
    return (flat - fake_quantize(flat)).abs().sum(-1, keepdim=True) * scale.abs().float()


def kept(table: WeakIdKeyDictionary, signs: torch.Tensor, state: tuple, make: Callable[[], Any]) -> Any:
    """A form derived from packed planes, kept in `table` under `signs` (weakly: it lives as long
    as the layer) and made again only when `state` (what it was made from) changed."""
    entry = table.get(signs)
    if entry is None or entry[0] != state:
        entry = (state, make())
        table[signs] = entry
    return entry[1]


def planes_state(signs: torch.Tensor, mask: Optional[torch.Tensor], in_features: int) -> tuple:
    """What a derived form depends on: the planes' identity and in-place versions."""
    return signs._version, in_features, None if mask is None else (id(mask), mask._version)


def _dense_weight(signs: torch.Tensor, mask: Optional[torch.Tensor], in_features: int) -> torch.Tensor:
    return kept(_dense, signs, planes_state(signs, mask, in_features),
                lambda: unpack_weight(signs, mask, in_features, torch.float32))


def _weight(signs: torch.Tensor, mask: Optional[torch.Tensor], in_features: int) -> tuple[torch.Tensor, ...]:
    """The prepacked int8 weight of these planes (with unit scales and zero points), built on
    first use and again when they change."""
    def make():
        w = unpack_weight(signs, mask, in_features, torch.float32).to(torch.int8)
        n = w.shape[0]
        return torch.ops.onednn.qlinear_prepack(w, None), torch.ones(n), torch.zeros(n, dtype=torch.int64)

    return kept(_prepacked, signs, planes_state(signs, mask, in_features), make)


def _gemm(u: torch.Tensor, w: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Rows u = q + 128 (uint8, `unsigned_planes`) × prepacked int8 weight → the exact integer
    products q·Wᵀ, as fp32 (unit scales).

    The rows go in as uint8 with zero point 128: x86 VNNI multiplies unsigned by signed bytes, and
    for int8 rows oneDNN ran a reference loop on a 2-core AMD EPYC VM (88 ms against 25 µs for
    uint8 at 32 × 512 × 512). oneDNN subtracts the zero point's share (128 · Σ w per output) in
    int32, so the products stay exact."""
    packed, ones, zeros = w
    return torch.ops.onednn.qlinear_pointwise(u, 1.0, 128, packed, ones, zeros, None, 1.0, 0, torch.float32,
                                              "none", [], "")


@functools.cache
def _weights(count: int) -> torch.Tensor:
    return torch.tensor([STEP ** -i for i in range(count)], dtype=torch.float32)


def binary_linear_cpu(x: torch.Tensor, signs: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor],
                      mask: Optional[torch.Tensor], in_features: int, extras: list[torch.Tensor],
                      steps: ep.Steps, activations: str) -> torch.Tensor:
    """See the module docstring."""
    n = signs.shape[0]
    flat = (x if x.dim() == 2 else x.reshape(-1, in_features)).float()  # reshape and to() cost ~1 µs even as no-ops
    if flat.shape[0] == 0:
        return x.new_empty((*x.shape[:-1], n))
    low, high, steps = ep.leading_clamp(steps)
    finish = Finish(scale.float(), None if bias is None else bias.float(), low, high)
    route = _route_for(flat, signs, mask, in_features, activations, finish)
    y, suspect = RUNS[route](flat, signs, mask, in_features, activations, finish)
    if suspect:
        _non_finite_rows(y, flat, signs, mask, in_features, finish)
    y = y if y.dtype == x.dtype else y.to(x.dtype)
    return ep.apply(y if x.dim() == 2 else y.reshape(*x.shape[:-1], n), steps, extras)


class Finish(NamedTuple):
    """What every route applies to its products x·Wᵀ: clamp((x·Wᵀ)⊙scale + bias, low, high), the
    bounds those of a relu or clamp the epilogue chain starts with (±inf: none). Folded in here,
    such a step costs no pass of its own (the AVX-512 kernel applies it in registers)."""
    scale: torch.Tensor
    bias: Optional[torch.Tensor]
    low: float = -math.inf
    high: float = math.inf


def _scaled(acc: torch.Tensor, flat: torch.Tensor, finish: Finish, check: bool) -> tuple[torch.Tensor, bool]:
    """What a route returns: `finish` applied to its unscaled products, and whether some row of x may not be finite (`check`: the route's numbers for such a row
    differ from a dense layer's; 2 µs at 1 × 4096)."""
    suspect = check and not math.isfinite(flat.sum().item())
    return _finished(acc, finish), suspect


def _finished(acc: torch.Tensor, finish: Finish) -> torch.Tensor:
    """`finish` applied to fresh products (in place but for the bias)."""
    scale, bias, low, high = finish
    y = acc.mul_(scale) if bias is None else torch.addcmul(bias, acc, scale)
    if low > -math.inf or high < math.inf:
        y = y.clamp_(None if low == -math.inf else low, None if high == math.inf else high)
    return y


def _non_finite_rows(y: torch.Tensor, flat: torch.Tensor, signs: torch.Tensor, mask: Optional[torch.Tensor],
                     in_features: int, finish: Finish) -> None:
    """In place: the rows of `y` whose input holds an inf or a NaN, as an fp32 GEMM computes them.
    The planes of such a row are not defined (its scale is not finite; `int8` activations quantize
    it likewise) and the bits loop's 2·Σ bit·x − Σ x turns ±inf into NaN, so each would return
    numbers a dense layer does not: finite ones, or the wrong sign. Rare enough to unpack the
    weight for."""
    bad = ~torch.isfinite(flat).all(-1)
    if bad.any():  # else only a finite row's sum overflowed
        y[bad] = _finished(F.linear(flat[bad], unpack_weight(signs, mask, in_features, torch.float32)), finish)


@contextlib.contextmanager
def forced_route(name: str) -> Iterator[None]:
    """Within the block, every call takes route `name` (one of ROUTES; `bits` only where the rows
    allow it, the int8 GEMM elsewhere) instead of the timed choice."""
    if name not in ROUTES:
        raise ValueError(f"forced_route: route must be one of {', '.join(ROUTES)}, got {name!r}")
    _forced.append(name)
    try:
        yield
    finally:
        _forced.pop()


def chosen_routes(signs: torch.Tensor) -> list[str]:
    """The routes the timed choice has taken for this layer's packed weight, at any batch size."""
    return sorted(set(_route.get(signs, {}).values()))


def _route_for(flat, signs, mask, in_features, activations, finish) -> str:
    bucket = 1 << (flat.shape[0] - 1).bit_length()
    bits = lambda: ((bucket <= BITS_ROWS or native.bits_product() is not None)  # noqa: E731
                    and _bits_kernel(flat, signs, mask, in_features) is not None)
    if _forced:
        return "int8" if _forced[-1] == "bits" and not bits() else _forced[-1]
    state = planes_state(signs, mask, in_features)
    routes = _route.get(signs, {})
    key = (state, activations, bucket)
    if key not in routes:
        routes = _route[signs] = {k: r for k, r in routes.items() if k[0] == state}  # planes changed: choose anew
        candidates = [r for r in ROUTES if (r != "bits" or bits()) and (r != "int8" or int8_gemm_pays())]
        routes[key] = _fastest(candidates, flat, signs, mask, in_features, activations, finish)
        used = set(routes.values())
        for table, route in ((_dense, "dense"), (_prepacked, "int8"), (_ternary, "bits"), (_lut, "bits")):
            if route not in used:
                table.pop(signs, None)
    return routes[key]


def _via_int8(flat, signs, mask, in_features, activations, finish) -> tuple[torch.Tensor, bool]:
    """x·Wᵀ, finished (`_scaled`), by the int8 GEMM on the activation planes."""
    w = _weight(signs, mask, in_features)
    count = PLANES[activations]
    us, s = unsigned_planes(flat, count)
    m, n = flat.shape[0], signs.shape[0]
    if count == 1:
        acc = _gemm(us[0], w)
    elif m <= STACK_ROWS:  # one GEMM over the planes stacked as rows, then Σᵢ 254⁻ⁱ·Yᵢ as one product
        acc = (_weights(count) @ _gemm(us.view(count * m, -1), w).view(count, m * n)).view(m, n)
    else:
        acc = _gemm(us[0], w)
        for i in range(1, count):
            acc = acc.add_(_gemm(us[i], w), alpha=STEP ** -i)
    return _scaled(acc.mul_(s), flat, finish, check=True)


def _via_dense(flat, signs, mask, in_features, activations, finish) -> tuple[torch.Tensor, bool]:
    """x·Wᵀ, finished, by an fp32 GEMM on the ±1 weight unpacked once (int8: on the quantized x)."""
    x = flat if activations == "exact" else fake_quantize(flat)
    acc = F.linear(x, _dense_weight(signs, mask, in_features))
    return _scaled(acc, flat, finish, check=activations != "exact")


def _bits_kernel(flat, signs, mask, in_features) -> Optional[tuple[Callable[..., tuple[torch.Tensor, bool]], int]]:
    """How the bits route computes rows like `flat`: (kernel, width), where kernel(x, flat, finish)
    takes x zero-padded to `width` columns and returns what a route returns (`_scaled`): the
    AVX-512 kernel where it runs, which finishes each output itself (`finish` None: the bare
    x·Wᵀ), else Inductor's loop; None where neither can run."""
    native_product = native.bits_product()
    if native_product is not None:
        return _native_kernel(native_product, signs, mask, in_features), signs.shape[1] * WORD
    words, bits = (signs, 1) if mask is None else (_codes(signs, mask, in_features), 2)  # Inductor's: 2-bit codes
    kernel = _kernel(flat, words, bits)
    if kernel is None:
        return None
    return (lambda x, flat, finish: _scaled(kernel(x, words), flat, finish, check=True),
            words.shape[1] * (WORD // bits))


def _native_kernel(product: Callable[..., int], signs: torch.Tensor, mask: Optional[torch.Tensor], in_features: int
                   ) -> Callable[..., tuple[torch.Tensor, bool]]:
    """The AVX-512 kernel bound to this weight's layouts (`lut_layout`; ternary: mask ∧ sign, the
    +1s, and mask ∧ ¬sign, the −1s, the same 2 bits per weight), made once and kept: each call
    then costs one ctypes call and the output's allocation (1024 × 1024 at batch 1: the kernel
    ~9 µs, the layer ~37 µs on the 2-core EPYC VM)."""
    def make():
        plus = lut_layout(signs if mask is None else mask & signs)
        minus = None if mask is None else lut_layout(mask & ~signs)
        n, words = signs.shape
        pointers = plus.data_ptr(), None if minus is None else minus.data_ptr()

        def run(x, flat, finish):
            # x contiguous (`_via_bits`); scale, bias made so and held until the call returns
            out = x.new_empty(x.shape[0], n)
            scale, bias, low, high = finish or (None, None, -math.inf, math.inf)
            scale = None if scale is None else scale.contiguous()
            bias = None if bias is None else bias.contiguous()
            suspect = product(x.data_ptr(), *pointers, None if scale is None else scale.data_ptr(),
                              None if bias is None else bias.data_ptr(), low, high, out.data_ptr(), x.shape[0], n,
                              words, torch.get_num_threads())
            if suspect < 0:
                raise MemoryError(f"fxopt: the AVX-512 bits kernel could not allocate {x.shape[0]} row sums")
            return out, bool(suspect)

        run.layouts = plus, minus  # the kernel reads them through `pointers`: they live as long as `run`
        return run

    return kept(_lut, signs, planes_state(signs, mask, in_features), make)


def lut_layout(words: torch.Tensor) -> torch.Tensor:
    """Packed (N, W) int32 planes as the AVX-512 kernel reads them (bits_avx512.c): for each block of
    16 outputs and each byte p of a row (columns 8p .. 8p + 7), the 16 outputs' bytes side by side,
    (⌈N/16⌉, 4·W, 16) uint8; outputs past N are zero. The same bits, regrouped."""
    rows = words.contiguous().view(torch.uint8)  # little-endian: byte p holds columns 8p .. 8p + 7
    rows = F.pad(rows, (0, 0, 0, -rows.shape[0] % 16))
    return rows.view(-1, 16, rows.shape[1]).transpose(1, 2).contiguous()


def _via_bits(flat, signs, mask, in_features, activations, finish) -> tuple[torch.Tensor, bool]:
    """x·Wᵀ, finished, by a loop over the packed words (int8: on the quantized x)."""
    x = flat if activations == "exact" else fake_quantize(flat)
    kernel, width = _bits_kernel(x, signs, mask, in_features)
    x = F.pad(x, (0, width - in_features)) if width != in_features else x.contiguous()  # the tail's weights are 0
    return kernel(x, flat, finish)


RUNS = {"bits": _via_bits, "int8": _via_int8, "dense": _via_dense}


def bits_product(x: torch.Tensor, words: torch.Tensor, bits: int) -> torch.Tensor:
    """x·Wᵀ from `bits`-bit fields c (least significant first, 32 / bits per int32 word) that hold
    W + 1 for bits = 2 (ternary: 0, 1, 2) or (W + 1) / 2 for bits = 1 (binary: the sign bit):
    Σ c·x·(2 / 2^(bits−1)) − Σ x. x: (rows, words · 32 / bits), zero past K. What `bits` compiles;
    Inductor turns the fields into floats in registers (the (out, words, fields) tensor is never made)."""
    per = WORD // bits
    shifts = torch.arange(0, WORD, bits, dtype=torch.int32, device=words.device)
    fields = ((words.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).to(x.dtype)
    total = (fields * x.view(x.shape[0], 1, words.shape[1], per)).sum((-1, -2))
    return (total * 2 if bits == 1 else total) - x.sum(-1, keepdim=True)


def ternary_codes(signs: torch.Tensor, mask: torch.Tensor, in_features: int) -> torch.Tensor:
    """The 2-bit form of a ternary weight: W + 1 (0, 1, 2) in field j of word w for column 16·w + j,
    (N, ⌈K/16⌉) int32 — the same 2 bits per weight as the sign and mask planes, interleaved so that
    one shift and mask give each weight."""
    n = signs.shape[0]
    codes = (unpack_weight(signs, mask, in_features, torch.float32) + 1).to(torch.int64)
    per = WORD // 2
    codes = F.pad(codes, (0, -in_features % per)).view(n, -1, per)
    words = (codes << torch.arange(0, WORD, 2)).sum(-1)
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)


def _codes(signs, mask, in_features) -> torch.Tensor:
    return kept(_ternary, signs, planes_state(signs, mask, in_features),
                lambda: ternary_codes(signs, mask, in_features))


def _kernel(x: torch.Tensor, words: torch.Tensor, bits: int) -> Optional[Callable]:
    """`bits_product` compiled by Inductor for these shapes (None where this machine cannot compile:
    no C++ compiler, for example; the GEMM routes then serve every batch)."""
    key = (x.shape[0], *words.shape, bits, torch.get_num_threads())
    if key not in _kernels:
        args = [torch.zeros(x.shape[0], words.shape[1] * (WORD // bits)), torch.zeros_like(words)]
        try:
            with torch.no_grad():
                _kernels[key] = torch._inductor.compile(make_fx(lambda x, w: bits_product(x, w, bits))(*args), args)
        except Exception as e:  # noqa: BLE001  any compiler failure: the GEMM routes remain, exact too
            log.warning("fxopt: the packed-bits CPU kernel could not be compiled (%s); using a GEMM", e)
            _kernels[key] = None
    return _kernels[key]


def _fastest(candidates, flat, signs, mask, in_features, activations, finish, reps: int = 3) -> str:
    """The fastest route on this input: each run once to warm up, then `reps` rounds that run every
    candidate in turn (9 where the calls are under 2 ms), each taking its fastest time: a burst of
    load on a shared machine then slows one run of each rather than every run of one (at 4096 ×
    4096, batch 1, median-of-three timed in sequence once kept the bits loop at 5.3× dense where
    the int8 GEMM on stacked planes ran 6.6×)."""
    runs = {name: RUNS[name] for name in candidates}
    for run in runs.values():  # first use: derived forms made, kernels compiled
        run(flat, signs, mask, in_features, activations, finish)
    seconds = dict.fromkeys(runs, float("inf"))
    done, rounds = 0, reps
    while done < rounds:
        for name, run in runs.items():
            start = time.perf_counter()
            run(flat, signs, mask, in_features, activations, finish)
            seconds[name] = min(seconds[name], time.perf_counter() - start)
        done += 1
        if done == 1 and max(seconds.values()) < 2e-3:
            rounds = 3 * reps
    return min(seconds, key=seconds.get)
