"""The CPU path of `fxopt::binary_linear`: ±1 (or −1/0/+1) weights as a prepacked int8 matrix, the
activations as int8 planes, one integer GEMM (oneDNN; AMX or VNNI where the CPU has them).

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

Small layers and batches: where the weight fits in cache, fp32 GEMMs are cheap and the int8
route's fixed costs (splitting, combining) dominate, so for each weight and batch-size bucket
(powers of two) the first call times both routes on its own input and keeps the faster: the int8
GEMM, or `F.linear` on an fp32 copy of the ±1 weight unpacked once (on the planes' sum for `int8`
activations, which keeps the numbers of that setting). The copy is kept only where a bucket chose
it, so large layers hold the int8 form (¼ of fp32) and small ones may hold fp32 in memory; the
saved file holds 1 bit per weight either way.

Only where oneDNN's quantized linear is present (x86 builds of torch); elsewhere the reference runs.
"""

from __future__ import annotations

import functools
import time
from typing import Any, Callable, Optional

import torch
from torch.utils.weak import WeakIdKeyDictionary

from fxopt.bits import unpack_weight

from . import epilogue as ep

ACTIVATIONS = ("exact", "int8")
PLANES = {"exact": 3, "int8": 1}
STEP = 254.0  # each plane refines the one before by this factor (residual ≤ ½ → ≤ 127)
STACK_ROWS = 64  # up to this many rows, the planes of a batch go through one GEMM stacked as rows

_prepacked = WeakIdKeyDictionary()  # signs → (state key, prepacked int8 weight, ones, zeros)
_dense = WeakIdKeyDictionary()  # signs → (state key, fp32 ±1 weight), where some bucket chose it
_route = WeakIdKeyDictionary()  # signs → {(state key, activations, bucket): "int8" | "dense"}


@functools.cache
def available() -> bool:
    """oneDNN's quantized linear is in this build of torch and runs."""
    try:
        w = torch.ops.onednn.qlinear_prepack(torch.ones(8, 8, dtype=torch.int8), None)
        _gemm(torch.ones(1, 8, dtype=torch.int8), (w, torch.ones(8), torch.zeros(8, dtype=torch.int64)))
        return True
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


def row_scale(x: torch.Tensor) -> torch.Tensor:
    """Per row of a 2-D x, the power of two s with max|x| / s in (63.5, 127] (1 for an all-zero row)."""
    top = x.abs().amax(-1, keepdim=True)
    s = torch.exp2(torch.ceil(torch.log2(top / 127.0)))
    return torch.where(top > 0, s, torch.ones_like(s))


def planes(x: torch.Tensor, count: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """`count` int8 planes of a 2-D float x and its row scales: x ≈ s·Σᵢ qᵢ·254⁻ⁱ."""
    s = row_scale(x)
    r = x / s  # exact: s is a power of two
    out = []
    for i in range(count):
        q = torch.round(r).clamp_(-127, 127)
        out.append(q.to(torch.int8))
        if i + 1 < count:
            r = (r - q) * STEP
    return out, s


def fake_quantize(x: torch.Tensor) -> torch.Tensor:
    """What the `int8` path computes with: each row of x as s·round(x / s) (any leading dims)."""
    flat = x.reshape(-1, x.shape[-1]).float()
    (q,), s = planes(flat, 1)
    return (q.float() * s).reshape(x.shape).to(x.dtype)


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


def _gemm(q: torch.Tensor, w: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """int8 rows × prepacked int8 weight → the exact integer products, as fp32 (unit scales)."""
    packed, ones, zeros = w
    return torch.ops.onednn.qlinear_pointwise(q, 1.0, 0, packed, ones, zeros, None, 1.0, 0, torch.float32,
                                              "none", [], "")


@functools.cache
def _weights(count: int) -> torch.Tensor:
    return torch.tensor([STEP ** -i for i in range(count)], dtype=torch.float32)


def binary_linear_cpu(x: torch.Tensor, signs: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor],
                      mask: Optional[torch.Tensor], in_features: int, extras: list[torch.Tensor],
                      steps: ep.Steps, activations: str) -> torch.Tensor:
    """See the module docstring."""
    n = signs.shape[0]
    flat = x.reshape(-1, in_features).float()
    m = flat.shape[0]
    if m == 0:
        return x.new_empty((*x.shape[:-1], n))
    routes = _route.setdefault(signs, {})
    key = (planes_state(signs, mask, in_features), activations, 1 << (m - 1).bit_length())
    if key not in routes:
        routes[key] = _fastest(flat, signs, mask, in_features, activations)
        if "dense" not in routes.values():
            _dense.pop(signs, None)
    run = _via_dense if routes[key] == "dense" else _via_int8
    acc = run(flat, signs, mask, in_features, activations)
    y = acc.mul_(scale.float()) if bias is None else torch.addcmul(bias.float(), acc, scale.float())
    return ep.apply(y.to(x.dtype).reshape(*x.shape[:-1], n), steps, extras)


def _via_int8(flat, signs, mask, in_features, activations) -> torch.Tensor:
    """x·Wᵀ (unscaled) by the int8 GEMM on the activation planes."""
    w = _weight(signs, mask, in_features)
    qs, s = planes(flat, PLANES[activations])
    m, n = flat.shape[0], signs.shape[0]
    if len(qs) == 1:
        acc = _gemm(qs[0], w)
    elif m <= STACK_ROWS:  # one GEMM over the planes stacked as rows, then Σᵢ 254⁻ⁱ·Yᵢ as one product
        acc = (_weights(len(qs)) @ _gemm(torch.cat(qs), w).view(len(qs), m * n)).view(m, n)
    else:
        acc = _gemm(qs[0], w)
        for i in range(1, len(qs)):
            acc = acc.add_(_gemm(qs[i], w), alpha=STEP ** -i)
    return acc.mul_(s)


def _via_dense(flat, signs, mask, in_features, activations) -> torch.Tensor:
    """x·Wᵀ (unscaled) by an fp32 GEMM on the ±1 weight unpacked once (int8: on the quantized x)."""
    x = flat if activations == "exact" else fake_quantize(flat)
    return torch.nn.functional.linear(x, _dense_weight(signs, mask, in_features))


def _fastest(flat, signs, mask, in_features, activations, reps: int = 3) -> str:
    """The faster route on this input: each run once to warm up, then the median of `reps`."""
    seconds = {}
    for name, run in (("int8", _via_int8), ("dense", _via_dense)):
        run(flat, signs, mask, in_features, activations)
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            run(flat, signs, mask, in_features, activations)
            times.append(time.perf_counter() - start)
        seconds[name] = sorted(times)[reps // 2]
    return min(seconds, key=seconds.get)
