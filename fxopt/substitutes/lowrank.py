"""Low-rank Linear: two thin linears from a truncated SVD (the `lowrank` substitute).

    W (m × n) ≈ U_r · S_r · V_rᵀ,   y = up(down(x)),   down.weight = √S_r·V_rᵀ (r × n),
                                                      up.weight   = U_r·√S_r  (m × r)

By Eckart–Young the truncated SVD is the best rank-r approximation of W in Frobenius (and
spectral) norm, so `from_original` is the optimal starting point for layer-wise training. It costs
r·(m + n) MACs per row against m·n for the dense layer.

    >>> layer = LowRankLinear.from_original(torch.nn.Linear(512, 512), max_flops_ratio=0.25)
    >>> layer.rank
    64
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from torch import nn

from fxopt.linalg import top_singular

from . import Decline, Param, Substitute, SubstituteSpec, doubled, float_above, optional, positive_int, register


class LowRankLinear(Substitute):
    """y = up(down(x)): n → r → m, bias on `up` (the original layer's, copied)."""

    fits_inputs = True

    def __init__(self, down: torch.Tensor, up: torch.Tensor, bias: torch.Tensor | None, error: float = 0.0):
        super().__init__()
        r, n = down.shape
        m = up.shape[0]
        self.in_features, self.out_features = n, m
        like = {"dtype": down.dtype, "device": down.device}
        self.down = nn.Linear(n, r, bias=False, **like)
        self.up = nn.Linear(r, m, bias=bias is not None, **like)
        with torch.no_grad():
            self.down.weight.copy_(down)
            self.up.weight.copy_(up)
            if bias is not None:
                self.up.bias.copy_(bias)
        self.reconstruction_error = error  # ‖W − up·down‖ / ‖W‖ at build time

    @property
    def rank(self) -> int:
        return self.down.out_features

    @classmethod
    def from_original(cls, linear: nn.Linear, rank: int | None = None,
                      max_flops_ratio: float | None = 0.5) -> "LowRankLinear":
        m, n = linear.weight.shape
        r = _resolve_rank(rank, max_flops_ratio, m, n)
        u, s, vh, error = top_singular(linear.weight.detach().double(), r)  # only the kept r triplets
        root = s.sqrt()
        dtype = linear.weight.dtype
        return cls((root[:, None] * vh).to(dtype), (u * root).to(dtype),
                   None if linear.bias is None else linear.bias.detach(), error)

    @torch.no_grad()
    def fit_inputs(self, linear: nn.Linear, gram: torch.Tensor, damping: float = 1e-3) -> None:
        """Refit to the inputs the layer sees: the rank-r W' minimising ‖(W − W')·X‖ over the
        calibration inputs X, given their Gram matrix G = X·Xᵀ (in × in). With S = G^½,
        W' = [W·S]_r · S⁻¹ (truncated SVD of the whitened weight): the closed-form optimum of
        layer-wise training's squared error, where the plain SVD optimises ‖W − W'‖ as if every
        input direction mattered equally. `damping` (relative to the mean diagonal) keeps S
        invertible for directions the calibration data never visits."""
        u, s, vh, inv_root = _whitened_svd(linear, gram, damping)
        r = self.rank
        half = s[:r].sqrt()
        self.down.weight.copy_(((half[:, None] * vh[:r]) @ inv_root).to(self.down.weight.dtype))
        self.up.weight.copy_((u[:, :r] * half).to(self.up.weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))  # two GEMMs: rows·r·n + rows·m·r MACs

    def dense_weight(self) -> torch.Tensor:
        return self.up.weight @ self.down.weight

    def flops(self, input_shape: torch.Size, output_shape: torch.Size | None = None) -> int:
        return 2 * math.prod(input_shape[:-1]) * self.rank * (self.in_features + self.out_features)

    def extra_repr(self) -> str:
        return f"{self.in_features}→{self.rank}→{self.out_features}"


def _whitened_svd(linear: nn.Linear, gram: torch.Tensor, damping: float = 1e-3):
    """(U, σ, Vᴴ, S⁻¹) with U·diag(σ)·Vᴴ = W·S, S = G^½ (G normalised to mean diagonal 1, plus
    `damping`·I), in float64."""
    w = linear.weight.detach().double()
    g = gram.double() / gram.diagonal().mean().clamp_min(1e-30)
    g = g + damping * torch.eye(g.shape[0], dtype=g.dtype, device=g.device)
    vals, vecs = torch.linalg.eigh(g)
    vals = vals.clamp_min(damping)
    root, inv_root = (vecs * vals.sqrt()) @ vecs.T, (vecs * vals.rsqrt()) @ vecs.T
    u, s, vh = torch.linalg.svd(w @ root, full_matrices=False)
    return u, s, vh, inv_root


def _resolve_rank(rank: int | None, max_flops_ratio: float | None, m: int, n: int) -> int:
    """Explicit rank, or the largest one within the FLOPs budget r·(m + n) ≤ ratio·m·n."""
    full = min(m, n)
    if rank is not None:
        if rank > full:
            raise Decline(f"rank {rank} exceeds min(out, in) = {full}")
        if max_flops_ratio is not None and rank * (m + n) > max_flops_ratio * m * n:
            raise Decline(f"rank {rank} costs {rank * (m + n) / (m * n):.2f}× the dense FLOPs "
                          f"(max_flops_ratio {max_flops_ratio:g})")
        return rank
    if max_flops_ratio is None:
        return full
    r = min(full, int(max_flops_ratio * m * n / (m + n) + 1e-9))
    if r < 1:
        raise Decline(f"rank 1 already costs {(m + n) / (m * n):.2f}× the dense FLOPs "
                      f"(max_flops_ratio {max_flops_ratio:g})")
    return r


def _build(module: nn.Module, params: Mapping[str, Any]) -> nn.Module:
    return LowRankLinear.from_original(module, rank=params["rank"], max_flops_ratio=params["max_flops_ratio"])


def _relax(params: Mapping[str, Any]) -> dict[str, Any] | None:
    """Twice the rank (and twice its FLOPs budget); none past full rank (the build then saves nothing)."""
    if params["rank"] is None and params["max_flops_ratio"] is None:
        return None
    return doubled(params, "rank", "max_flops_ratio")


SPEC = register(SubstituteSpec(
    name="lowrank",
    summary="W ≈ U_r·S_r·V_rᵀ: two thin linears from a truncated SVD (Eckart–Young optimal)",
    ops=("linear",),
    params=(
        Param("rank", "inner dimension r (null: the largest within max_flops_ratio)", optional(positive_int)),
        Param("max_flops_ratio", "FLOPs budget: r·(in + out) ≤ this × in·out (null: none); an explicit rank "
              "over it is declined", optional(float_above(0.0))),
    ),
    build=_build,
    defaults=LowRankLinear.from_original,
    exact=lambda layer: {"rank": None, "max_flops_ratio": None},
    relax=_relax,
))
