"""Kronecker-factored Linear and Conv layers (Zhou et al., arXiv 1512.09194).

A dense weight W (m × n) is replaced by a sum of R Kronecker products,

    W ≈ Σ_r A_r ⊗ B_r,      A_r: m1 × n1,  B_r: m2 × n2,  m = m1·m2,  n = n1·n2,

and applied without ever forming W: with the input reshaped to X (n1 × n2),
(A ⊗ B)·vec(X) = vec(A · X · Bᵀ) (row-major vec), i.e. two small GEMMs.

`from_original` finds the nearest Kronecker sum in Frobenius norm (Van Loan & Pitsianis, 1993):
rearranging W so that each block becomes a row turns Σ_r A_r ⊗ B_r into the rank-R matrix
Σ_r vec(A_r)·vec(B_r)ᵀ, so a truncated SVD of the rearranged weight is optimal. At full rank
(R = min(m1·n1, m2·n2)) the original weight is reproduced exactly.

Convolutions are factored over channels and keep the spatial kernel in B:
W[o1·O2+o2, i1·I2+i2, k] = Σ_r A_r[o1, i1] · B_r[o2, i2, k]; the layer becomes a small
convolution applied to each of the I1 channel groups, followed by a channel mixing GEMM with A.

    >>> layer = KronLinear.from_original(torch.nn.Linear(256, 256), rank=4)  # 32× fewer weights
    >>> layer.factors, layer.rank
    ((16, 16, 16, 16), 4)
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from fxopt.codegen.kron import kron_linear, kron_linear_torch
from fxopt.codegen.registry import pick
from fxopt.linalg import top_singular

from . import Decline, FusedEpilogue, Param, Substitute, SubstituteSpec, conv_guard, float_above, optional, positive_int, register


def _balanced(n: int) -> tuple[int, int]:
    """n = a·b with a ≤ b and a as large as possible (the most balanced factorisation)."""
    a = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    return a, n // a


def macs_ratio(m1: int, m2: int, n1: int, n2: int, rank: int, k: int = 0) -> float:
    """MACs of the Kronecker layer over those of the dense one, the same for every input shape
    (both scale with the rows / output pixels). k = 0: linear (A applied first, R·m1·n2·(n1 + m2)
    per row); k ≥ 1: conv with a k-element kernel (B first, R·m2·n1·(n2·k + m1) per pixel)."""
    if k == 0:
        return rank * (n1 + m2) / (m2 * n1)
    return rank * (n2 * k + m1) / (m1 * n2 * k)


def choose_factors(m: int, n: int, k: int = 0) -> tuple[int, int, int, int]:
    """(m1, m2, n1, n2) from the balanced splits of m and n, oriented for the fewest parameters
    per Kronecker term (m1·n1 + m2·n2·k; k = kernel size kept in B, 0 for linear), then the
    fewest MACs."""
    (ma, mb), (na, nb) = _balanced(m), _balanced(n)
    candidates = [(m1, m // m1, n1, n // n1) for m1 in {ma, mb} for n1 in {na, nb}]
    return min(candidates, key=lambda f: (f[0] * f[2] + f[1] * f[3] * max(k, 1), macs_ratio(*f, 1, k), f))


def nearest_kronecker_sum(weight: torch.Tensor, m1: int, m2: int, n1: int, n2: int, rank: int):
    """Best rank-`rank` Kronecker sum of `weight` (m1·m2 × n1·n2 × *kernel) in Frobenius norm.

    Returns A (rank, m1, n1), B (rank, m2, n2, *kernel) and the relative Frobenius error
    ‖W − Σ A_r ⊗ B_r‖ / ‖W‖, exact (fxopt.linalg.top_singular; no W is rebuilt).
    """
    kernel = tuple(weight.shape[2:])
    k = math.prod(kernel)
    # rearrangement R̃[(i1, j1), (i2, j2, k)] = W[i1·m2 + i2, j1·n2 + j2, k]
    w = weight.detach().double().reshape(m1, m2, n1, n2, k).permute(0, 2, 1, 3, 4)
    u, s, vh, error = top_singular(w.reshape(m1 * n1, m2 * n2 * k), rank)  # only the kept terms
    root = s.sqrt()
    a = (u * root).T.reshape(rank, m1, n1)
    b = (vh.T * root).T.reshape(rank, m2, n2, *kernel)
    return a.to(weight.dtype), b.to(weight.dtype), error


def _resolve_rank(rank: Any, compression: float | None, max_flops_ratio: float | None,
                  factors: tuple[int, int, int, int], k: int = 0) -> int:
    """The rank: explicit, 'full', or the largest that meets both budgets, `compression`
    (parameters) and `max_flops_ratio` (FLOPs against the dense layer). An explicit rank over the
    FLOPs budget, or a layer where even rank 1 misses a budget, is declined."""
    m1, m2, n1, n2 = factors
    kk = max(k, 1)
    dense, per_term, full = m1 * m2 * n1 * n2 * kk, m1 * n1 + m2 * n2 * kk, min(m1 * n1, m2 * n2 * kk)
    per_rank = macs_ratio(m1, m2, n1, n2, 1, k)
    if rank == "full":
        r = full
    elif rank is not None:
        if rank > full:
            raise Decline(f"rank {rank} exceeds the full Kronecker rank {full}")
        r = rank
    else:
        r = min(full, int(dense // (compression * per_term)))
        if r < 1:
            raise Decline(f"rank 1 compresses only {dense / per_term:.1f}×, below the requested {compression:g}×")
        if max_flops_ratio is not None:
            r = min(r, int(max_flops_ratio / per_rank + 1e-9))
            if r < 1:
                raise Decline(f"rank 1 already costs {per_rank:.2f}× the dense FLOPs "
                              f"(max_flops_ratio {max_flops_ratio:g})")
        return r
    if max_flops_ratio is not None and r * per_rank > max_flops_ratio + 1e-9:
        raise Decline(f"rank {r} costs {r * per_rank:.2f}× the dense FLOPs (max_flops_ratio {max_flops_ratio:g})")
    return r


def kronecker_sum(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Σ_r A_r ⊗ B_r as a (m1·m2 × n1·n2 × *kernel) weight, from A (R, m1, n1) and B (R, m2, n2, *kernel)."""
    _, m1, n1 = a.shape
    _, m2, n2, *kernel = b.shape
    return torch.einsum("rij,rkl...->ikjl...", a, b).reshape(m1 * m2, n1 * n2, *kernel)


class _Kron(Substitute):
    """Shared construction for the Kronecker layers: factors, rank, reconstruction error."""

    def _setup(self, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None, error: float):
        self.A = nn.Parameter(a.contiguous())  # (R, m1, n1)
        self.B = nn.Parameter(b.contiguous())  # (R, m2, n2, *kernel)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        self.reconstruction_error = error  # relative Frobenius error of the weight at build time

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def factors(self) -> tuple[int, int, int, int]:
        """(m1, m2, n1, n2)."""
        return self.A.shape[1], self.B.shape[1], self.A.shape[2], self.B.shape[2]

    def dense_weight(self) -> torch.Tensor:
        """Σ_r A_r ⊗ B_r materialised (for tests and error reports; forward never builds it)."""
        return kronecker_sum(self.A, self.B)


class KronLinear(FusedEpilogue, _Kron):
    """y = x·Wᵀ + b with W = Σ_r A_r ⊗ B_r, computed as two small GEMMs.

    `epilogue` (set by the `fuse` pass; empty by default) is a chain of pointwise steps that the
    layer applies to its output (fxopt.codegen.epilogue), reading `extras` (a residual, a scale
    vector) passed after x: `layer(x, *extras)`. Inside the Triton kernel the chain runs before
    the store; in the torch reference, step by step after the GEMMs."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None, error: float = 0.0):
        super().__init__()
        self._setup(a, b, bias, error)
        m1, m2, n1, n2 = self.factors
        self.in_features, self.out_features = n1 * n2, m1 * m2

    @classmethod
    def from_original(cls, linear: nn.Linear, rank: int | str | None = None, compression: float | None = 32.0,
                      factors: Any = "auto", max_flops_ratio: float | None = None) -> "KronLinear":
        m, n = linear.weight.shape
        m1, m2, n1, n2 = _factors(factors, m, n)
        r = _resolve_rank(rank, compression, max_flops_ratio, (m1, m2, n1, n2))
        a, b, err = nearest_kronecker_sum(linear.weight, m1, m2, n1, n2, r)
        return cls(a, b, linear.bias, err)

    def forward(self, x: torch.Tensor, *extras: torch.Tensor) -> torch.Tensor:
        # Y = Σ_r A_r·X·B_rᵀ with X the row reshaped to n1 × n2. Where the registry wants Triton
        # (CUDA tensors) one fused kernel through the op; elsewhere the two GEMMs in plain torch,
        # which Inductor and torch.export see through (the op's dispatch alone costs ~20 µs on CPU)
        return pick(x, self._kernel, self._reference)(x, *extras)

    def _kernel(self, x: torch.Tensor, *extras: torch.Tensor) -> torch.Tensor:
        return kron_linear(x, self.A, self.B, self.bias, list(extras), self._epilogue_text)

    def _reference(self, x: torch.Tensor, *extras: torch.Tensor) -> torch.Tensor:
        return kron_linear_torch(x, self.A, self.B, self.bias, list(extras), self.epilogue)

    def flops(self, input_shape: torch.Size, output_shape: torch.Size | None = None) -> int:
        r, (m1, m2, n1, n2) = self.rank, self.factors
        rows = math.prod(input_shape[:-1])
        return 2 * rows * r * m1 * n2 * (n1 + m2)

    def extra_repr(self) -> str:
        m1, m2, n1, n2 = self.factors
        text = f"{self.in_features}→{self.out_features}, rank={self.rank}, A={m1}×{n1}, B={m2}×{n2}"
        return text + (f", epilogue={self._epilogue_text}" if self.epilogue else "")


class KronConv(_Kron):
    """Channel-Kronecker convolution (1-d or 2-d): a small conv per input-channel group, then a
    channel-mixing GEMM with A. Stride, padding and dilation are the original layer's."""

    def __init__(self, a, b, bias, error: float, stride, padding, dilation):
        super().__init__()
        self._setup(a, b, bias, error)
        self.stride, self.padding, self.dilation = stride, padding, dilation
        m1, m2, n1, n2 = self.factors
        self.in_channels, self.out_channels = n1 * n2, m1 * m2
        self.kernel_size = tuple(b.shape[3:])

    @classmethod
    def from_original(cls, conv: nn.Conv1d | nn.Conv2d, rank: int | str | None = None, compression: float | None = 32.0,
                      factors: Any = "auto", max_flops_ratio: float | None = None) -> "KronConv":
        conv_guard(conv, "kron")
        o, i, *kernel = conv.weight.shape
        k = math.prod(kernel)
        m1, m2, n1, n2 = _factors(factors, o, i, k)
        r = _resolve_rank(rank, compression, max_flops_ratio, (m1, m2, n1, n2), k)
        a, b, err = nearest_kronecker_sum(conv.weight, m1, m2, n1, n2, r)
        cls_ = {1: KronConv1d, 2: KronConv2d}[len(kernel)]
        return cls_(a, b, conv.bias, err, conv.stride, conv.padding, conv.dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r, m1, n1 = self.A.shape
        _, m2, n2, *kernel = self.B.shape
        if x.dim() == len(kernel) + 1:  # unbatched input, as nn.Conv accepts it
            return self.forward(x.unsqueeze(0)).squeeze(0)
        batch, spatial = x.shape[0], x.shape[2:]
        conv = F.conv1d if len(kernel) == 1 else F.conv2d
        # small conv on each of the n1 channel groups, all R terms at once:
        # N·n1·R·m2·n2·K·|out| MACs
        z = conv(x.reshape(batch * n1, n2, *spatial), self.B.reshape(r * m2, n2, *kernel),
                 None, self.stride, self.padding, self.dilation)
        out = z.shape[2:]
        pixels = math.prod(out)
        # channel mixing with A: N·m2·|out|·R·n1·m1 MACs
        z = z.reshape(batch, n1, r, m2, pixels).permute(0, 3, 4, 2, 1).reshape(-1, r * n1)
        y = z @ self.A.permute(0, 2, 1).reshape(r * n1, m1)
        y = y.reshape(batch, m2, pixels, m1).permute(0, 3, 1, 2).reshape(batch, m1 * m2, *out)
        if self.bias is not None:
            y = y + self.bias.reshape(-1, *([1] * len(out)))
        return y

    def flops(self, input_shape: torch.Size, output_shape: torch.Size) -> int:
        r, (m1, m2, n1, n2) = self.rank, self.factors
        k, pixels = math.prod(self.kernel_size), math.prod(output_shape[2:])
        return 2 * input_shape[0] * pixels * r * m2 * n1 * (n2 * k + m1)

    def extra_repr(self) -> str:
        m1, m2, n1, n2 = self.factors
        kernel = "×".join(map(str, self.kernel_size))
        return (f"{self.in_channels}→{self.out_channels}, kernel={kernel}, rank={self.rank}, "
                f"A={m1}×{n1}, B={m2}×{n2}×{kernel}, stride={self.stride}, padding={self.padding}")


class KronConv1d(KronConv):
    pass


class KronConv2d(KronConv):
    pass


class MixedKronLinear(Substitute):
    """y = x·Wᵀ + b with W = Σ_g Σ_r A_gr ⊗ B_gr: Kronecker sums of *different* factor shapes
    (Zhou et al. §3.3: mixing shapes raises capacity at the same parameter count). Each group is a
    `KronLinear` without bias (so it runs as the fused kernel on a GPU); their outputs are summed.

    `from_original` fits the groups one after the other, each the nearest Kronecker sum of its
    shape to what the previous ones left (W, then W − group 1, …), so the mixture's error is never
    above its first shape's alone; then `sweeps` rounds of refitting each group to what all the
    others leave (block coordinate descent: the error never grows), which recovers a weight that is
    a sum of products of the given shapes, where the greedy pass alone does not."""

    def __init__(self, groups: list[KronLinear], bias: torch.Tensor | None, error: float):
        super().__init__()
        self.groups = nn.ModuleList(groups)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        self.in_features, self.out_features = groups[0].in_features, groups[0].out_features
        self.reconstruction_error = error

    @classmethod
    def from_original(cls, linear: nn.Linear, factors: Any, max_flops_ratio: float | None = None,
                      sweeps: int = 30) -> "MixedKronLinear":
        m, n = linear.weight.shape
        w = linear.weight.detach().double()
        shapes = [(*_factors(g, m, n), g["rank"]) for g in factors]
        per_row = sum(macs_ratio(m1, m2, n1, n2, min(r, m1 * n1, m2 * n2)) for m1, m2, n1, n2, r in shapes)
        if max_flops_ratio is not None and per_row > max_flops_ratio + 1e-9:
            raise Decline(f"the mixture costs {per_row:.2f}× the dense FLOPs (max_flops_ratio {max_flops_ratio:g})")
        fits = [torch.zeros_like(w) for _ in shapes]
        terms: list = [None] * len(shapes)
        norm, last = w.norm(), math.inf
        for sweep in range(max(1, sweeps)):
            # sweep 0 fits each group to what the previous ones left; later sweeps refit each group
            # to what all the others leave (each step optimal given the others: the error never grows)
            for g, (m1, m2, n1, n2, r) in enumerate(shapes):
                rest = w - sum(f for h, f in enumerate(fits) if h != g)
                a, b, _ = nearest_kronecker_sum(rest, m1, m2, n1, n2, min(r, m1 * n1, m2 * n2))
                terms[g] = (a, b)
                fits[g] = kronecker_sum(a, b)
            error = ((w - sum(fits)).norm() / norm).item() if norm > 0 else 0.0
            if last - error <= 1e-12 * max(error, 1.0):
                break
            last = error
        dtype = linear.weight.dtype
        groups = [KronLinear(a.to(dtype), b.to(dtype)) for a, b in terms]
        return cls(groups, linear.bias, error)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.groups[0](x)
        for group in self.groups[1:]:
            y = y + group(x)
        return y if self.bias is None else y + self.bias

    def dense_weight(self) -> torch.Tensor:
        return sum(g.dense_weight() for g in self.groups)

    def flops(self, input_shape: torch.Size, output_shape: torch.Size | None = None) -> int:
        return sum(g.flops(input_shape) for g in self.groups)

    def extra_repr(self) -> str:
        shapes = " + ".join(f"{g.rank}×({g.factors[0]}×{g.factors[2]} ⊗ {g.factors[1]}×{g.factors[3]})" for g in self.groups)
        return f"{self.in_features}→{self.out_features}, {shapes}"


def _factors(factors: Any, m: int, n: int, k: int = 0) -> tuple[int, int, int, int]:
    if factors == "auto":
        return choose_factors(m, n, k)
    (m1, m2), (n1, n2) = factors["out"], factors["in"]
    if m1 * m2 != m or n1 * n2 != n:
        raise Decline(f"factors out={m1}×{m2}, in={n1}×{n2} do not fit a {m}×{n} weight")
    return m1, m2, n1, n2


# --- registration -------------------------------------------------------------------------

def _parse_rank(value: Any) -> int | str:
    return "full" if value == "full" else positive_int(value)


def _parse_factors(value: Any) -> Any:
    if value == "auto":
        return value
    if isinstance(value, list) and value:  # mixed shapes: one group per entry, each with its rank
        return tuple(_parse_group(entry, i) for i, entry in enumerate(value))
    shape = _parse_shape(value)
    if shape is not None:
        return shape
    raise ValueError(f"expected 'auto', {{out: [m1, m2], in: [n1, n2]}} or a list of "
                     f"{{out: [m1, m2], in: [n1, n2], rank: R}}, got {value!r}")


def _parse_shape(value: Any, with_rank: bool = False) -> dict | None:
    if isinstance(value, dict) and set(value) == {"out", "in"} | ({"rank"} if with_rank else set()):
        pairs = {k: value[k] for k in ("out", "in")}
        if all(isinstance(v, list) and len(v) == 2 for v in pairs.values()):
            return {k: tuple(positive_int(x) for x in v) for k, v in pairs.items()}
    return None


def _parse_group(entry: Any, i: int) -> dict:
    if isinstance(entry, dict) and set(entry) == {"out", "in"}:
        raise ValueError(f"factors[{i}]: each shape of a mixture needs its rank ({{out: …, in: …, rank: R}})")
    shape = _parse_shape(entry, with_rank=True)
    if shape is None:
        raise ValueError(f"factors[{i}]: expected {{out: [m1, m2], in: [n1, n2], rank: R}}, got {entry!r}")
    return shape | {"rank": positive_int(entry["rank"])}


def _check(given: Mapping[str, Any]) -> None:
    if "rank" in given and "compression" in given:
        raise ValueError("give either 'rank' or 'compression', not both")
    if isinstance(given.get("factors"), tuple) and ("rank" in given or "compression" in given):
        raise ValueError("with a list of factor shapes, each shape carries its own rank: drop 'rank'/'compression'")


def _relax(params: Mapping[str, Any]) -> dict[str, Any] | None:
    """Twice the Kronecker terms (every group's, in a mixture), within the same FLOPs budget."""
    if isinstance(params["factors"], tuple):
        return dict(params) | {"factors": tuple(g | {"rank": 2 * g["rank"]} for g in params["factors"])}
    if params["rank"] == "full":
        return None
    if params["rank"] is not None:
        return dict(params) | {"rank": 2 * params["rank"]}
    if params["compression"] is None or params["compression"] <= 2.0:
        return None
    return dict(params) | {"compression": params["compression"] / 2}


def _build(module: nn.Module, params: Mapping[str, Any]) -> nn.Module:
    if isinstance(params["factors"], tuple):
        if not isinstance(module, nn.Linear):
            raise Decline("mixed factor shapes are built for linear layers only")
        return MixedKronLinear.from_original(module, params["factors"], params["max_flops_ratio"])
    compression = None if params["rank"] is not None else params["compression"]
    kwargs = dict(rank=params["rank"], compression=compression, factors=params["factors"],
                  max_flops_ratio=params["max_flops_ratio"])
    if isinstance(module, nn.Linear):
        return KronLinear.from_original(module, **kwargs)
    return KronConv.from_original(module, **kwargs)


SPEC = register(SubstituteSpec(
    name="kron",
    summary="W ≈ Σ_r A_r ⊗ B_r (Zhou et al. 1512.09194), nearest Kronecker sum by SVD",
    ops=("linear", "conv1d", "conv2d"),
    params=(
        Param("rank", "number of Kronecker terms R, or 'full' (exact); overrides compression", _parse_rank),
        Param("compression", "parameter budget: at least this many times fewer weights; R is the largest "
              "rank within both budgets", float_above(1.0)),
        Param("max_flops_ratio", "FLOPs budget: at most this times the dense layer's FLOPs (null: none); "
              "an explicit rank over it is declined", optional(float_above(0.0)), default=1.0),
        Param("factors", "'auto' (most balanced), {out: [m1, m2], in: [n1, n2]}, or a mixture: a list of "
              "{out: [m1, m2], in: [n1, n2], rank: R}, fitted one after the other on the residual", _parse_factors),
    ),
    build=_build,
    defaults=KronLinear.from_original,
    check=_check,
    exact=lambda layer: {"rank": "full", "max_flops_ratio": None},
    relax=_relax,
))
