"""Bottleneck convolution (the `bottleneck` substitute; Zeng & Tian 2017): 1×1 reduce → k×k → 1×1 expand.

A convolution W (o × i × k) is replaced by

    reduce: 1×1, i → r_i      core: k×k, r_i → r_o (the original stride/padding/dilation)
    expand: 1×1, r_o → o (bias)

which is the Tucker-2 form W ≈ C ×₀ U_o ×₁ U_i (Kim et al. 2016, "Compression of deep
convolutional neural networks for fast and low power mobile applications"). `from_original` starts
from the truncated HOSVD (U_o, U_i: leading left singular vectors of W's mode-0 and mode-1
unfoldings) and refines it by a few HOOI sweeps (alternating least squares, each sweep is optimal
in one factor given the other), then C = W ×₀ U_oᵀ ×₁ U_iᵀ. With r_i = i and r_o = o it is exact.
Ranks are ⌈channels / reduction⌉.

    >>> b = BottleneckConv.from_original(torch.nn.Conv2d(64, 128, 3, padding=1), reduction=4)
    >>> b.ranks
    (16, 32)
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from torch import nn

from fxopt.linalg import top_singular

from . import (Decline, Param, Substitute, SubstituteSpec, conv_class, conv_guard, doubled, float_above, non_negative_int, number_in,
               optional, register)


def tucker2(weight: torch.Tensor, r_out: int, r_in: int, sweeps: int = 5):
    """(core, U_out, U_in, relative error) of the Tucker-2 approximation of an o × i × K tensor."""
    w = weight.detach().double().reshape(weight.shape[0], weight.shape[1], -1)
    o, i, k = w.shape

    def leading(mat: torch.Tensor, r: int) -> torch.Tensor:  # only the r vectors kept (fxopt.linalg)
        return top_singular(mat, r)[0]

    u_in = leading(w.permute(1, 0, 2).reshape(i, o * k), r_in)  # HOSVD start
    u_out = leading(w.reshape(o, i * k), r_out)
    for _ in range(sweeps):  # HOOI: each factor optimal given the other
        u_in = leading(torch.einsum("oik,or->irk", w, u_out).reshape(i, r_out * k), r_in)
        u_out = leading(torch.einsum("oik,is->osk", w, u_in).reshape(o, r_in * k), r_out)
    core = torch.einsum("oik,or,is->rsk", w, u_out, u_in)
    approx = torch.einsum("rsk,or,is->oik", core, u_out, u_in)
    norm = w.norm()
    error = ((w - approx).norm() / norm).item() if norm > 0 else 0.0
    return core, u_out, u_in, error


class BottleneckConv(Substitute):
    """reduce (1×1) → core (k×k) → expand (1×1, bias)."""

    def __init__(self, reduce: nn.Module, core: nn.Module, expand: nn.Module, error: float = 0.0):
        super().__init__()
        self.reduce, self.core, self.expand = reduce, core, expand
        self.in_channels, self.out_channels = reduce.in_channels, expand.out_channels
        self.kernel_size = core.kernel_size
        self.reconstruction_error = error

    @property
    def ranks(self) -> tuple[int, int]:
        """(r_in, r_out)."""
        return self.core.in_channels, self.core.out_channels

    @classmethod
    def from_original(cls, conv: nn.Module, reduction: float = 4.0, sweeps: int = 5,
                      max_flops_ratio: float | None = 0.5) -> "BottleneckConv":
        conv_guard(conv, "bottleneck")
        o, i, *kernel = conv.weight.shape
        k = math.prod(kernel)
        r_in, r_out = math.ceil(i / reduction), math.ceil(o / reduction)
        # per output pixel (ignoring the stride: reduce runs on input pixels, so a strided
        # layer pays more than this): i·r_in + r_in·r_out·K + r_out·o MACs against i·o·K
        ratio = (i * r_in + r_in * r_out * k + r_out * o) / (i * o * k)
        if max_flops_ratio is not None and ratio > max_flops_ratio + 1e-9:
            raise Decline(f"ranks {r_in}/{r_out} cost {ratio:.2f}× the dense FLOPs (max_flops_ratio {max_flops_ratio:g})")
        core, u_out, u_in, error = tucker2(conv.weight, r_out, r_in, sweeps)
        conv_cls, ones, dtype = conv_class(len(kernel)), [1] * len(kernel), conv.weight.dtype
        like = {"dtype": dtype, "device": conv.weight.device}
        reduce = conv_cls(i, r_in, 1, bias=False, **like)
        core_conv = conv_cls(r_in, r_out, conv.kernel_size, conv.stride, conv.padding, conv.dilation, bias=False, **like)
        expand = conv_cls(r_out, o, 1, bias=conv.bias is not None, **like)
        with torch.no_grad():
            reduce.weight.copy_(u_in.T.reshape(r_in, i, *ones).to(dtype))
            core_conv.weight.copy_(core.reshape(r_out, r_in, *kernel).to(dtype))
            expand.weight.copy_(u_out.reshape(o, r_out, *ones).to(dtype))
            if conv.bias is not None:
                expand.bias.copy_(conv.bias)
        return cls(reduce, core_conv, expand, error)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.expand(self.core(self.reduce(x)))

    def dense_weight(self) -> torch.Tensor:
        """The o × i × k weight this module applies (for tests and error reports)."""
        u_in = self.reduce.weight.flatten(1)  # r_in × i
        u_out = self.expand.weight.flatten(1)  # o × r_out
        core = self.core.weight
        return torch.einsum("rs...,or,si->oi...", core, u_out, u_in)

    def flops(self, input_shape: torch.Size, output_shape: torch.Size) -> int:
        r_in, r_out = self.ranks
        n, k = input_shape[0], math.prod(self.kernel_size)
        in_px, out_px = math.prod(input_shape[2:]), math.prod(output_shape[2:])
        return 2 * n * (in_px * self.in_channels * r_in + out_px * (r_in * r_out * k + r_out * self.out_channels))

    def extra_repr(self) -> str:
        r_in, r_out = self.ranks
        return f"{self.in_channels}→{r_in}→{r_out}→{self.out_channels}"


def _build(module: nn.Module, params: Mapping[str, Any]) -> nn.Module:
    return BottleneckConv.from_original(module, reduction=params["reduction"], sweeps=params["sweeps"],
                                        max_flops_ratio=params["max_flops_ratio"])


def _relax(params: Mapping[str, Any]) -> dict[str, Any] | None:
    """Half the channel reduction (inner widths doubled), twice the FLOPs budget."""
    if params["reduction"] <= 1.0:
        return None
    return doubled(params, "max_flops_ratio") | {"reduction": max(1.0, params["reduction"] / 2)}


SPEC = register(SubstituteSpec(
    name="bottleneck",
    summary="1×1 reduce → k×k → 1×1 expand, Tucker-2 (HOSVD + HOOI) init (Zeng & Tian 2017)",
    ops=("conv1d", "conv2d"),
    params=(
        Param("reduction", "channel reduction (≥ 1): inner widths are ⌈channels / reduction⌉",
              number_in(1.0, low_open=False)),
        Param("sweeps", "HOOI refinement sweeps after the HOSVD start (0: plain HOSVD)", non_negative_int),
        Param("max_flops_ratio", "FLOPs budget against the dense layer (null: none)", optional(float_above(0.0))),
    ),
    build=_build,
    defaults=BottleneckConv.from_original,
    exact=lambda conv: {"reduction": 1.0, "max_flops_ratio": None},
    relax=_relax,
))
