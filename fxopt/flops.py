"""FLOPs of linear and convolution layers: 2 × the multiply-accumulates of their matmuls and
convolutions (bias adds and elementwise ops are not counted), for given input/output shapes."""

from __future__ import annotations

import math

import torch
from torch import nn


def dense_flops(module: nn.Module, in_shape: torch.Size, out_shape: torch.Size) -> int:
    w = module.weight
    if isinstance(module, nn.Linear):
        return 2 * math.prod(in_shape[:-1]) * w.shape[0] * w.shape[1]
    # conv: every output element costs (in_channels / groups) · kernel MACs
    return 2 * math.prod(out_shape) * math.prod(w.shape[1:])


def substitute_flops(substitute, original: nn.Module, in_shape: torch.Size, out_shape: torch.Size) -> int:
    """FLOPs of a substitute (fxopt.substitutes.Substitute) standing in for `original`: its own
    count, or the dense layer's where it does not change the count (binary: additions instead)."""
    count = substitute.flops(in_shape, out_shape)
    return dense_flops(original, in_shape, out_shape) if count is None else count


def param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def storage_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers as stored (a packed binary layer: its int32
    words, scales and bias)."""
    tensors = {id(t): t for t in (*module.parameters(), *module.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())
