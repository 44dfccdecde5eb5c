"""Depthwise-separable convolution (the `separable` substitute; Zeng & Tian 2017, as in MobileNet).

A k×k convolution W (o × i × k) is replaced by a depthwise k×k convolution with `multiplier` (μ)
filters per input channel, followed by a pointwise 1×1 convolution:

    W[o, c, :] ≈ Σ_{j<μ} P[o, c·μ + j] · D[c·μ + j, :]

The structure decouples over input channels c, so the best approximation in Frobenius norm is,
for each c, the rank-μ truncated SVD of the o × K matrix W[:, c, :] (Eckart–Young): P takes the
left singular vectors scaled by the singular values, D the right ones. That is what
`from_original` builds; with μ ≥ min(o, K) it is exact. Per output pixel it costs
i·μ·K + i·μ·o MACs against i·o·K.

    >>> sep = SeparableConv.from_original(torch.nn.Conv2d(64, 64, 3, padding=1), multiplier=1)
    >>> sep.depthwise.weight.shape, sep.pointwise.weight.shape
    (torch.Size([64, 1, 3, 3]), torch.Size([64, 64, 1, 1]))
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from torch import nn

from . import Decline, Param, Substitute, SubstituteSpec, conv_class, conv_guard, doubled, float_above, optional, positive_int, register


class SeparableConv(Substitute):
    """depthwise (k×k, groups=in_channels, the original stride/padding/dilation) → pointwise (1×1, bias)."""

    def __init__(self, depthwise: nn.Module, pointwise: nn.Module, error: float = 0.0):
        super().__init__()
        self.depthwise, self.pointwise = depthwise, pointwise
        self.in_channels, self.out_channels = depthwise.in_channels, pointwise.out_channels
        self.kernel_size = depthwise.kernel_size
        self.reconstruction_error = error

    @property
    def multiplier(self) -> int:
        return self.depthwise.out_channels // self.depthwise.in_channels

    @classmethod
    def from_original(cls, conv: nn.Module, multiplier: int = 1,
                      max_flops_ratio: float | None = 0.5) -> "SeparableConv":
        conv_guard(conv, "separable")
        o, i, *kernel = conv.weight.shape
        k = math.prod(kernel)
        if k == 1:
            raise Decline("a 1×1 convolution has no spatial kernel to separate")
        mu = multiplier
        ratio = mu * (k + o) / (o * k)
        if max_flops_ratio is not None and ratio > max_flops_ratio + 1e-9:
            raise Decline(f"multiplier {mu} costs {ratio:.2f}× the dense FLOPs (max_flops_ratio {max_flops_ratio:g})")
        # per input channel c: W[:, c, :] (o × K) = U·S·Vᵀ, keep μ terms
        w = conv.weight.detach().double().permute(1, 0, *range(2, 2 + len(kernel))).reshape(i, o, k)
        u, s, vh = torch.linalg.svd(w, full_matrices=False)  # (i, o, q), (i, q), (i, q, K)
        q = s.shape[1]
        keep = min(mu, q)
        point = torch.zeros(o, i, mu, dtype=torch.float64)
        depth = torch.zeros(i, mu, k, dtype=torch.float64)
        point[:, :, :keep] = (u[:, :, :keep] * s[:, None, :keep]).permute(1, 0, 2)
        depth[:, :keep] = vh[:, :keep]
        total = s.square().sum()
        error = (s[:, keep:].square().sum() / total).sqrt().item() if total > 0 else 0.0
        conv_cls, like = conv_class(len(kernel)), {"dtype": conv.weight.dtype, "device": conv.weight.device}
        dw = conv_cls(i, i * mu, conv.kernel_size, conv.stride, conv.padding, conv.dilation, groups=i, bias=False, **like)
        pw = conv_cls(i * mu, o, 1, bias=conv.bias is not None, **like)
        dtype = conv.weight.dtype
        with torch.no_grad():
            dw.weight.copy_(depth.reshape(i * mu, 1, *kernel).to(dtype))
            pw.weight.copy_(point.reshape(o, i * mu, *([1] * len(kernel))).to(dtype))
            if conv.bias is not None:
                pw.bias.copy_(conv.bias)
        return cls(dw, pw, error)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(x))

    def dense_weight(self) -> torch.Tensor:
        """The o × i × k weight this module applies (for tests and error reports)."""
        mu, i = self.multiplier, self.in_channels
        kernel = self.depthwise.weight.shape[2:]
        d = self.depthwise.weight.reshape(i, mu, -1)
        p = self.pointwise.weight.reshape(self.out_channels, i, mu)
        return torch.einsum("ocj,cjk->ock", p, d).reshape(self.out_channels, i, *kernel)

    def flops(self, input_shape: torch.Size, output_shape: torch.Size) -> int:
        pixels = math.prod(output_shape[2:]) * input_shape[0]
        k = math.prod(self.kernel_size)
        width = self.in_channels * self.multiplier
        return 2 * pixels * width * (k + self.out_channels)

    def extra_repr(self) -> str:
        return f"{self.in_channels}→{self.out_channels}, multiplier={self.multiplier}"


def _build(module: nn.Module, params: Mapping[str, Any]) -> nn.Module:
    return SeparableConv.from_original(module, multiplier=params["multiplier"],
                                       max_flops_ratio=params["max_flops_ratio"])


def _relax(params: Mapping[str, Any]) -> dict[str, Any]:
    """Twice the depthwise filters per channel, twice the FLOPs budget."""
    return doubled(params, "multiplier", "max_flops_ratio")


SPEC = register(SubstituteSpec(
    name="separable",
    summary="depthwise k×k + pointwise 1×1, per-channel SVD init (Zeng & Tian 2017)",
    ops=("conv1d", "conv2d"),
    params=(
        Param("multiplier", "depthwise filters per input channel (μ); exact at μ ≥ min(out, k)", positive_int),
        Param("max_flops_ratio", "FLOPs budget: μ·(k + out)/(out·k) ≤ this (null: none)", optional(float_above(0.0))),
    ),
    build=_build,
    defaults=SeparableConv.from_original,
    exact=lambda conv: {"multiplier": min(conv.out_channels, math.prod(conv.kernel_size)), "max_flops_ratio": None},
    relax=_relax,
))
