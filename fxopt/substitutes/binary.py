"""Binarized and ternarized layers (Lin, Courbariaux, Memisevic & Bengio, "Neural Networks with Few
Multiplications", arXiv 1510.03009), the `binary` substitute.

Inference form: W ≈ α ⊙ sign(W), one α per output channel. For a fixed sign pattern the
least-squares α is mean |W| of the channel (‖W − α·s‖² is a parabola in α with its minimum there), so
`from_original` starts from the optimum. `ternary` mode keeps only the weights above a threshold
Δ = threshold · mean|W| (values {−α, 0, +α}; α = mean |W| over the kept ones, again the
least-squares optimum for that support). Multiplications by weights become sign changes; what is
left is one multiply per output (α).

Training form (`BinaryLinear`, `BinaryConv1d`, `BinaryConv2d`): real-valued latent weights in
[−1, 1] (`constrain_()` clips them after each optimizer step, as BinaryConnect does); the forward
pass binarizes them

    deterministic:  w_b = sign(w)                        (sign(0) = +1)
    stochastic:     w_b = +1 with probability hard_sigmoid(w) = clip((w + 1)/2, 0, 1), else −1
    ternary:        sign(w)·[|w| > Δ]  (deterministic),  sign(w) with probability |w|, else 0 (stochastic)

and the backward pass is the straight-through estimator, ∂L/∂w = ∂L/∂w_b. With `backprop_bits`
set, the weight gradient uses the layer input quantized to powers of two (the paper's "quantized
back propagation"): ΔW = δ · Q(x)ᵀ with Q(x) = sign(x)·2^round(log₂|x|), exponents limited to the
2^bits values counting down from the largest element's (smaller magnitudes round to 0), so the
remaining multiplications are shifts. The input gradient δ·(α⊙W_b) already involves only sign
changes. In eval mode the forward is deterministic whatever `stochastic` says.

`packed()` turns a trained layer into its deployable form, `PackedBinaryLinear` / `PackedBinaryConv`:
signs packed 32 per int32 (fxopt.bits; ternary adds a mask plane), α and bias kept in the original
dtype. That is what fxopt saves (about 1/32 of the fp32 bytes for the weight) and what runs the
`fxopt::binary_linear` kernel on a GPU.

    >>> layer = BinaryLinear.from_original(torch.nn.Linear(256, 128))
    >>> packed = layer.packed()                    # 128 × 8 int32 words + 128 scales + bias
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from fxopt.bits import pack_bits, pack_signs, unpack_weight
from fxopt.codegen.binary import CONV_GRADS, CONVS, binary_conv_call, binary_linear_call, binary_weight
from fxopt.codegen.binary_cpu import ACTIVATIONS, fake_quantize

from . import Decline, FusedEpilogue, Param, Substitute, SubstituteSpec, boolean, int_in, number_in, one_of, optional, register

MODES = ("binary", "ternary")


# --- quantizers (the paper's formulas; tests check them one by one) ---------------------------

def hard_sigmoid(w: torch.Tensor) -> torch.Tensor:
    return ((w + 1) / 2).clamp(0, 1)


def binarize(w: torch.Tensor, stochastic: bool = False) -> torch.Tensor:
    """±1: sign(w) (0 → +1), or +1 with probability hard_sigmoid(w)."""
    if stochastic:
        return torch.where(torch.rand_like(w) < hard_sigmoid(w), 1.0, -1.0).to(w.dtype)
    return torch.where(w >= 0, 1.0, -1.0).to(w.dtype)


def ternarize(w: torch.Tensor, threshold: float, stochastic: bool = False) -> torch.Tensor:
    """−1/0/+1 per row of w (dim 0 = output channel): sign(w) where |w| > threshold·mean|w| of the
    row; stochastically, sign(w) with probability min(|w|, 1), else 0."""
    if stochastic:
        keep = torch.rand_like(w) < w.abs().clamp(max=1)
    else:
        rows = w.abs().flatten(1).mean(1)
        keep = w.abs() > threshold * rows.view(-1, *[1] * (w.dim() - 1))
    return torch.where(keep, torch.sign(w), 0.0).to(w.dtype)


def pow2_quantize(x: torch.Tensor, bits: int) -> torch.Tensor:
    """sign(x)·2^e, e = round(log₂|x|) clipped to the 2^bits exponents from the largest
    element's down; |x| below that range (and 0) → 0."""
    mag = x.abs()
    top = mag.max()
    if top == 0:
        return torch.zeros_like(x)
    e = torch.round(torch.log2(mag.clamp_min(torch.finfo(x.dtype).tiny)))
    e_max = torch.round(torch.log2(top))
    e_min = e_max - (2 ** bits - 1)
    e = e.clamp(max=e_max)
    q = torch.sign(x) * torch.exp2(e)
    return torch.where(e < e_min, torch.zeros_like(x), q)


def straight_through(latent: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
    """`quantized` in the forward pass, identity gradient to `latent` in the backward pass."""
    return latent + (quantized - latent).detach()


class QuantizedBackprop(torch.autograd.Function):
    """y = linear/conv(x, w); backward: ∂L/∂x exact, ∂L/∂w computed from pow2_quantize(x, bits).

    `conv` is None for a linear layer, else (dims, stride, padding, dilation, groups).
    """

    @staticmethod
    def forward(ctx, x, weight, bits, conv):
        ctx.save_for_backward(x, weight)
        ctx.bits, ctx.conv = bits, conv
        if conv is None:
            return F.linear(x, weight)
        dims, stride, padding, dilation, groups = conv
        return CONVS[dims](x, weight, None, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        gx = gw = None
        if ctx.conv is None:
            if ctx.needs_input_grad[0]:
                gx = grad @ weight
            if ctx.needs_input_grad[1]:
                xq = pow2_quantize(x, ctx.bits)  # shifts instead of multiplies: δ · 2^e
                gw = grad.reshape(-1, weight.shape[0]).T @ xq.reshape(-1, weight.shape[1])
        else:
            dims, stride, padding, dilation, groups = ctx.conv
            grad_input, grad_weight = CONV_GRADS[dims]
            if ctx.needs_input_grad[0]:
                gx = grad_input(x.shape, weight, grad, stride, padding, dilation, groups)
            if ctx.needs_input_grad[1]:
                gw = grad_weight(pow2_quantize(x, ctx.bits), weight.shape, grad, stride, padding, dilation, groups)
        return gx, gw, None, None


# --- from a dense weight to (α, latent) -------------------------------------------------------

def channel_scales(weight: torch.Tensor, mode: str, threshold: float) -> torch.Tensor:
    """Least-squares α per output channel: mean |W| over the channel's kept weights."""
    w = weight.detach().flatten(1).abs()
    if mode == "binary":
        return w.mean(1)
    kept = w > threshold * w.mean(1, keepdim=True)
    return (w * kept).sum(1) / kept.sum(1).clamp_min(1)


def quantization_error(weight: torch.Tensor, mode: str, threshold: float) -> float:
    """‖W − α ⊙ Q(W)‖ / ‖W‖: what binarizing costs before any training."""
    w = weight.detach().double()
    q = binarize(w) if mode == "binary" else ternarize(w, threshold)
    alpha = channel_scales(w, mode, threshold).view(-1, *[1] * (w.dim() - 1))
    total = w.norm()
    return ((w - alpha * q).norm() / total).item() if total > 0 else 0.0


class _Binary(Substitute):
    """Shared state: latent weights in [−1, 1], α per output channel, optional bias. FLOPs: the
    base class's dense count (the MACs remain, as additions and sign changes)."""

    def _setup(self, weight: torch.Tensor, bias: torch.Tensor | None, mode: str, threshold: float,
               stochastic: bool, backprop_bits: int | None) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        w = weight.detach()
        top = w.flatten(1).abs().amax(1).clamp_min(torch.finfo(w.dtype).tiny)
        self.latent = nn.Parameter((w / top.view(-1, *[1] * (w.dim() - 1))).clamp(-1, 1))
        self.scale = nn.Parameter(channel_scales(w, mode, threshold).to(w.dtype))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        self.mode, self.threshold, self.stochastic, self.backprop_bits = mode, threshold, stochastic, backprop_bits
        self.reconstruction_error = quantization_error(w, mode, threshold)

    def quantized(self) -> torch.Tensor:
        """The ±1 (or −1/0/+1) weights the forward pass uses: stochastic only while training."""
        stochastic = self.stochastic and self.training
        if self.mode == "binary":
            return binarize(self.latent, stochastic)
        return ternarize(self.latent, self.threshold, stochastic)

    def quantized_weight(self) -> torch.Tensor:
        """α ⊙ Q(latent), with the straight-through gradient to the latent weights."""
        q = straight_through(self.latent, self.quantized())
        return q * self.scale.view(-1, *[1] * (q.dim() - 1))

    @torch.no_grad()
    def constrain_(self) -> None:
        """Clip the latent weights to [−1, 1]; call after each optimizer step (BinaryConnect)."""
        self.latent.clamp_(-1, 1)

    def _packed_planes(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        q = (binarize(self.latent) if self.mode == "binary" else ternarize(self.latent, self.threshold)).flatten(1)
        return pack_signs(q), (pack_bits(q != 0) if self.mode == "ternary" else None)

    def _frozen_tensors(self) -> dict[str, Any]:
        signs, mask = self._packed_planes()
        return {"signs": signs, "mask": mask, "scale": self.scale.detach().clone(),
                "bias": None if self.bias is None else self.bias.detach().clone()}

    def extra_repr(self) -> str:
        extra = f", threshold={self.threshold:g}" if self.mode == "ternary" else ""
        extra += ", stochastic" if self.stochastic else ""
        extra += f", backprop_bits={self.backprop_bits}" if self.backprop_bits else ""
        return f"{tuple(self.latent.shape)}, {self.mode}{extra}"


class BinaryLinear(_Binary):
    """With `activations="int8"` the layer computes with each row of its input quantized to int8
    (codegen.binary_cpu.fake_quantize; straight-through gradient), as its packed form's int8 path
    does, so validation measures that error per site."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, mode: str = "binary",
                 threshold: float = 0.7, stochastic: bool = False, backprop_bits: int | None = None,
                 activations: str = "exact"):
        super().__init__()
        if activations not in ACTIVATIONS:
            raise ValueError(f"activations must be one of {ACTIVATIONS}, got {activations!r}")
        self.out_features, self.in_features = weight.shape
        self.activations = activations
        self._setup(weight, bias, mode, threshold, stochastic, backprop_bits)

    @classmethod
    def from_original(cls, linear: nn.Linear, mode: str = "binary", threshold: float = 0.7,
                      stochastic: bool = False, backprop_bits: int | None = None,
                      activations: str = "exact") -> "BinaryLinear":
        return cls(linear.weight, linear.bias, mode, threshold, stochastic, backprop_bits, activations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activations == "int8":
            x = straight_through(x, fake_quantize(x.detach()))
        w = self.quantized_weight()
        if self.backprop_bits and self.training:
            y = QuantizedBackprop.apply(x, w, self.backprop_bits, None)
        else:
            y = F.linear(x, w)
        return y if self.bias is None else y + self.bias

    def packed(self) -> "PackedBinaryLinear":
        return PackedBinaryLinear(in_features=self.in_features, activations=self.activations,
                                  **self._frozen_tensors())

    def extra_repr(self) -> str:
        return super().extra_repr() + (", int8 activations" if self.activations == "int8" else "")

    deployable = packed


class BinaryConv(_Binary):
    """Binarized Conv1d/Conv2d (any groups, zero padding); use BinaryConv1d / BinaryConv2d."""

    dims = 0

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, stride, padding, dilation, groups: int,
                 mode: str = "binary", threshold: float = 0.7, stochastic: bool = False,
                 backprop_bits: int | None = None):
        super().__init__()
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        self._setup(weight, bias, mode, threshold, stochastic, backprop_bits)

    @classmethod
    def from_original(cls, conv: nn.Conv1d | nn.Conv2d, mode: str = "binary", threshold: float = 0.7,
                      stochastic: bool = False, backprop_bits: int | None = None) -> "BinaryConv":
        if conv.padding_mode != "zeros":
            raise Decline(f"padding_mode={conv.padding_mode!r} is not supported by binary")
        cls = {1: BinaryConv1d, 2: BinaryConv2d}[conv.weight.dim() - 2]
        return cls(conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups,
                   mode, threshold, stochastic, backprop_bits)

    def _conv_args(self) -> tuple:
        return (self.dims, self.stride, self.padding, self.dilation, self.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.quantized_weight()
        if self.backprop_bits and self.training:
            return QuantizedBackprop.apply(x, w, self.backprop_bits, self._conv_args()) + _channel(self.bias, x)
        return CONVS[self.dims](x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def packed(self) -> "PackedBinaryConv":
        return PackedBinaryConv(shape=tuple(self.latent.shape), conv=self._conv_args(), **self._frozen_tensors())

    deployable = packed


class BinaryConv1d(BinaryConv):
    dims = 1


class BinaryConv2d(BinaryConv):
    dims = 2


def _channel(v: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | float:
    """A per-channel vector shaped to broadcast over (N, C, *spatial) x."""
    return 0.0 if v is None else v.view(1, -1, *[1] * (x.dim() - 2))


# --- deployable forms: packed bits, no latent weights -----------------------------------------

class _Packed(Substitute):
    def _setup(self, signs, mask, scale, bias) -> None:
        self.register_buffer("signs", signs)
        self.register_buffer("mask", mask)
        self.register_buffer("scale", scale)
        self.register_buffer("bias", bias)

    def _weight(self, k: int, dtype: torch.dtype) -> torch.Tensor:
        return unpack_weight(self.signs, self.mask, k, dtype)


class PackedBinaryLinear(FusedEpilogue, _Packed):
    """y = epilogue((x·Wᵀ)⊙α + b, *extras) with W packed 32 per int32, through the
    `fxopt::binary_linear` op (Triton on a GPU; on a CPU a compiled loop over the packed bits for
    a few rows, an int8 or fp32 GEMM on W unpacked once for more, exact unless
    `activations="int8"`; the saved program keeps the op, so the weights stay packed). The fuse
    pass sets `epilogue`, as for KronLinear."""

    def __init__(self, signs: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, in_features: int,
                 mask: torch.Tensor | None = None, epilogue: tuple = (), activations: str = "exact"):
        super().__init__()
        self.in_features, self.out_features = in_features, signs.shape[0]
        self.epilogue, self.activations = epilogue, activations
        self._setup(signs, mask, scale, bias)

    def forward(self, x: torch.Tensor, *extras: torch.Tensor) -> torch.Tensor:
        return binary_linear_call(x, self.signs, self.scale, self.bias, self.mask, self.in_features, list(extras),
                                  self._epilogue_text, self.activations)

    def dense_weight(self) -> torch.Tensor:
        return self._weight(self.in_features, self.scale.dtype) * self.scale[:, None]

    def extra_repr(self) -> str:
        kind = "ternary" if self.mask is not None else "binary"
        fused = f", epilogue={self._epilogue_text}" if self.epilogue else ""
        int8 = ", int8 activations" if self.activations == "int8" else ""
        return f"{self.in_features}→{self.out_features}, {kind}, packed{int8}{fused}"


class PackedBinaryConv(_Packed):
    """Packed conv: torch's convolution on α ⊙ W, unpacked once per weight and kept
    (`fxopt::binary_conv`), as dense as the original's (no 1-bit conv kernel yet). Padding given as
    'same' with an odd total takes `fxopt::binary_weight` (a copy of the kept weight) and F.conv."""

    def __init__(self, signs, scale, bias, shape: tuple[int, ...], conv: tuple, mask=None):
        super().__init__()
        self.shape = shape
        self.dims, self.stride, self.padding, self.dilation, self.groups = conv
        self._setup(signs, mask, scale, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        padding = self._symmetric_padding()
        if padding is not None:
            return binary_conv_call(x, self.signs, self.scale, self.bias, self.mask, list(self.shape),
                                    list(self.stride), padding, list(self.dilation), self.groups)
        w = binary_weight(self.signs, self.scale, self.mask, math.prod(self.shape[1:]), x.dtype).view(self.shape)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return CONVS[self.dims](x, w, bias, self.stride, self.padding, self.dilation, self.groups)

    def _symmetric_padding(self) -> list[int] | None:
        """The padding as integers per side ('valid': 0; 'same': half the kernel's reach where
        that is even), or None where it cannot be (odd 'same')."""
        if not isinstance(self.padding, str):
            return list(self.padding)
        if self.padding == "valid":
            return [0] * self.dims
        reach = [d * (k - 1) for d, k in zip(self.dilation, self.shape[2:])]
        return None if any(r % 2 for r in reach) else [r // 2 for r in reach]

    def extra_repr(self) -> str:
        kind = "ternary" if self.mask is not None else "binary"
        return f"{self.shape}, {kind}, packed"


# --- whole models: train binarized from the start, then pack -------------------------------------

_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)


def to_binary(model: nn.Module, exclude: tuple[str, ...] = (), **params: Any) -> nn.Module:
    """Replace, in place, every Linear/Conv1d/Conv2d of `model` (except the qualified names in
    `exclude`) by its binary training form, initialised from its current weights; returns `model`.

    Training loop (BinaryConnect): `loss.backward(); opt.step(); fxopt.substitutes.constrain_([model])`.

        >>> net = to_binary(nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10)), backprop_bits=3)
    """
    for name, child in list(model.named_modules()):
        for attr, layer in list(child.named_children()):
            path = f"{name}.{attr}" if name else attr
            if isinstance(layer, _LAYERS) and path not in exclude:
                binary = BinaryLinear.from_original(layer, **params) if isinstance(layer, nn.Linear) \
                    else BinaryConv.from_original(layer, **params)
                setattr(child, attr, binary.train(layer.training))
    return model


def packed_model(model: nn.Module) -> nn.Module:
    """Replace, in place, every binary training-form layer of `model` by its packed 1-bit form."""
    for child in list(model.modules()):
        for attr, layer in list(child.named_children()):
            if isinstance(layer, _Binary):
                setattr(child, attr, layer.packed())
    return model


def _build(module: nn.Module, params: Mapping[str, Any]) -> nn.Module:
    kwargs = {k: params[k] for k in ("mode", "threshold", "stochastic", "backprop_bits")}
    if isinstance(module, nn.Linear):
        return BinaryLinear.from_original(module, **kwargs, activations=params["activations"])
    if params["activations"] != "exact":
        raise Decline("activations: int8 applies to linear layers (convolutions compute exactly)")
    return BinaryConv.from_original(module, **kwargs)


def _on_grid(layer: nn.Module) -> None:
    """Set a layer's weights to α·sign(w) per output channel, where binarization is exact."""
    with torch.no_grad():
        w = layer.weight
        alpha = w.flatten(1).abs().mean(1).view(-1, *[1] * (w.dim() - 1))
        w.copy_(alpha * torch.where(w >= 0, 1.0, -1.0))


SPEC = register(SubstituteSpec(
    name="binary",
    summary="W ≈ α·sign(W) per output channel (or ternary), saved 1 bit per weight (Lin et al. 1510.03009)",
    ops=("linear", "conv1d", "conv2d"),
    params=(
        Param("mode", "binary (±α) or ternary (−α, 0, +α)", one_of(MODES)),
        Param("threshold", "ternary only: weights with |w| ≤ threshold·mean|w| of their channel become 0",
              number_in(0.0, 1.0)),
        Param("stochastic", "training: binarize stochastically (p(+1) = hard_sigmoid(w)); eval is always "
              "deterministic", boolean),
        Param("backprop_bits", "training: exponent bits of the power-of-two quantized layer input in the weight "
              "gradient (null: exact)", optional(int_in(1, 8))),
        Param("activations", "linear layers: exact (default), or int8 (each input row quantized to int8 per row: "
              "faster on a CPU, and an error that validation reports)", one_of(ACTIVATIONS)),
    ),
    build=_build,
    defaults=BinaryLinear.from_original,
    representable=_on_grid,
    saves_flops=False,
))
