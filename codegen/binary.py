"""1-bit weight matmul: y = epilogue((x · Wᵀ) ⊙ α + b) with W ∈ {−1, +1} (or {−1, 0, +1}) packed 32 per int32.

The op `fxopt::binary_linear` is what a packed binary layer (`fxopt.substitutes.binary`) calls and
what its saved model holds. The registry (`codegen.registry`) picks the implementation:

* torch reference: unpack W to the activation dtype, one GEMM, scale, bias, activation;
* CPU (codegen.binary_cpu): for a few rows an Inductor-compiled loop over the packed words; for
  more, W unpacked once to a prepacked int8 matrix and the activations split into int8 planes
  whose integer products are exact (one oneDNN GEMM), or an fp32 copy, whichever was faster;
* Triton: the weights stay packed in global memory (1/16 of the bytes of bf16) and are unpacked in
  registers, tile by tile; scale, bias and the generated epilogue (codegen.epilogue: any chain
  the fuse pass accepts, as for kron) run on the fp32 accumulator before the one store.
  - GEMV path (batch ≤ 16, the memory-bound case): one program per (block of outputs, input row);
    each program streams its packed rows once along K, so the weight bytes read are N·K/8 per row
    of the batch, the re-reads served from L2.
  - GEMM path (larger batches): tiled `tl.dot` with the unpacked ±1 tile as the right operand,
    grouped launch order for L2 reuse, autotuned tile sizes.

Weight layout (fxopt.bits): `signs` (N, ⌈K/32⌉) int32, bit j of word w of row n = sign of W[n, 32w+j]
(1 → +1); `mask` (same shape, ternary only) = W[n, 32w+j] ≠ 0. fp32 activations use IEEE fp32 dot
products (not TF32), so the kernel matches the reference to fp32 rounding.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

from fxopt.bits import unpack_weight, words_for

from . import epilogue as ep
from .binary_cpu import ACTIVATIONS, available, binary_linear_cpu, fake_quantize, kept, planes_state
from .registry import HAVE_TRITON, direct_call, eager_inference, interpreted, pick

GEMV_MAX_ROWS = 16


def binary_linear_reference(x: torch.Tensor, signs: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor],
                            mask: Optional[torch.Tensor], in_features: int, extras: list[torch.Tensor],
                            steps: ep.Steps) -> torch.Tensor:
    """Plain torch: the oracle every implementation is tested against."""
    y = F.linear(x, unpack_weight(signs, mask, in_features, x.dtype)) * scale.to(x.dtype)
    if bias is not None:
        y = y + bias.to(x.dtype)
    return ep.apply(y, steps, extras)


if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _unpack_tile(ptr, offs_n, word0, N, KW, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """(BLOCK_N, BLOCK_K) bits {0, 1} of rows offs_n, columns 32·word0 … 32·word0 + BLOCK_K."""
        WPB: tl.constexpr = BLOCK_K // 32  # int32 words per row of the tile
        offs_w = word0 + tl.arange(0, WPB)
        words = tl.load(ptr + offs_n[:, None] * KW + offs_w[None, :],
                        mask=(offs_n[:, None] < N) & (offs_w[None, :] < KW), other=0)
        bits = (words[:, :, None] >> tl.arange(0, 32)[None, None, :]) & 1  # (BLOCK_N, WPB, 32)
        return tl.reshape(bits, (BLOCK_N, BLOCK_K))

    @triton.jit
    def _weight_tile(s_ptr, m_ptr, offs_n, word0, N, KW, dtype: tl.constexpr,
                     TERNARY: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """The ±1 (or −1/0/+1) weight tile in `dtype`; columns past K come out −1 but meet x = 0."""
        w = (_unpack_tile(s_ptr, offs_n, word0, N, KW, BLOCK_N, BLOCK_K) * 2 - 1).to(dtype)
        if TERNARY:
            w = w * _unpack_tile(m_ptr, offs_n, word0, N, KW, BLOCK_N, BLOCK_K).to(dtype)
        return w

    @triton.jit
    def _scale_bias(acc, offs_n, scale_ptr, bias_ptr, N, HAS_BIAS: tl.constexpr):
        """Per-output-channel scale and bias, in fp32 (the generated epilogue follows)."""
        acc = acc * tl.load(scale_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
        if HAS_BIAS:
            acc = acc + tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
        return acc

    @triton.jit
    def _gemv_kernel(
        x_ptr, s_ptr, m_ptr, scale_ptr, bias_ptr, y_ptr,
        N, K, KW,                      # outputs, inputs, int32 words per weight row
        stride_xm, stride_ym,          # row strides (columns are contiguous)
        e0, r0, c0, e1, r1, c1, e2, r2, c2, e3, r3, c3,   # the epilogue's extras (codegen.epilogue)
        HAS_BIAS: tl.constexpr, TERNARY: tl.constexpr, EPILOGUE: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        # grid: (⌈N / BLOCK_N⌉, rows); program (i, m) computes y[m, i·BLOCK_N : (i+1)·BLOCK_N]
        pid_n = tl.program_id(0)
        row = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + row * stride_xm + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
            w = _weight_tile(s_ptr, m_ptr, offs_n, k0 // 32, N, KW, tl.float32, TERNARY, BLOCK_N, BLOCK_K)
            acc += tl.sum(w * x[None, :], axis=1)  # sign flips and adds: no weight multiplies to speak of
        acc = _scale_bias(acc, offs_n, scale_ptr, bias_ptr, N, HAS_BIAS)
        acc = EPILOGUE(acc, row, offs_n, offs_n < N, e0, r0, c0, e1, r1, c1, e2, r2, c2, e3, r3, c3)
        tl.store(y_ptr + row * stride_ym + offs_n, acc.to(y_ptr.dtype.element_ty), mask=offs_n < N)

    @triton.jit
    def _gemm_kernel(
        x_ptr, s_ptr, m_ptr, scale_ptr, bias_ptr, y_ptr,
        M, N, K, KW,
        stride_xm, stride_ym,
        e0, r0, c0, e1, r1, c1, e2, r2, c2, e3, r3, c3,
        HAS_BIAS: tl.constexpr, TERNARY: tl.constexpr, EPILOGUE: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    ):
        # grouped ordering: GROUP_M row-blocks share each column-block while it is in L2
        pid = tl.program_id(0)
        num_m = tl.cdiv(M, BLOCK_M)
        num_n = tl.cdiv(N, BLOCK_N)
        group = GROUP_M * num_n
        first_m = (pid // group) * GROUP_M
        size_m = min(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % group) % size_m
        pid_n = (pid % group) // size_m
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                        mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)
            w = _weight_tile(s_ptr, m_ptr, offs_n, k0 // 32, N, KW, x.dtype, TERNARY, BLOCK_N, BLOCK_K)
            acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)
        acc = _scale_bias(acc, offs_n, scale_ptr, bias_ptr, N, HAS_BIAS)
        out_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        acc = EPILOGUE(acc, offs_m[:, None], offs_n[None, :], out_mask, e0, r0, c0, e1, r1, c1, e2, r2, c2, e3, r3, c3)
        tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty), mask=out_mask)

    _GEMV_CONFIGS = [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w)
                     for n in (16, 32, 64) for k in (256, 512, 1024) for w in (4, 8)]
    _GEMM_CONFIGS = [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_warps=w, num_stages=s)
        for m, n, k, w, s in [
            (128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 128, 8, 3),
            (64, 128, 64, 4, 4), (128, 64, 64, 4, 4), (64, 64, 128, 4, 4),
        ]
    ]
    _gemv_tuned = triton.autotune(_GEMV_CONFIGS, key=["N", "K"])(_gemv_kernel)
    _gemm_tuned = triton.autotune(_GEMM_CONFIGS, key=["M", "N", "K"])(_gemm_kernel)
    # The interpreter cannot time configs: it runs one small fixed tile (masked tails included).
    _GEMV_INTERPRETED = {"BLOCK_N": 16, "BLOCK_K": 64}
    _GEMM_INTERPRETED = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 64, "GROUP_M": 2}


def binary_linear_triton(x: torch.Tensor, signs: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor],
                         mask: Optional[torch.Tensor], in_features: int, extras: list[torch.Tensor],
                         steps: ep.Steps) -> torch.Tensor:
    """Launcher: check → allocate → launch (GEMV for ≤ 16 rows, GEMM above)."""
    n, kw = signs.shape
    k = in_features
    if x.shape[-1] != k or kw != words_for(k) or scale.shape != (n,):
        raise ValueError(f"binary_linear: x {tuple(x.shape)}, signs {tuple(signs.shape)}, scale {tuple(scale.shape)} "
                         f"do not fit in_features={k}")
    x2 = x.reshape(-1, k).contiguous()
    m = x2.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    out_shape = (*x.shape[:-1], n)
    if m == 0:
        return y.reshape(out_shape)
    signs, scale = signs.contiguous(), scale.contiguous()
    mask_t = signs if mask is None else mask.contiguous()  # never read when not ternary
    bias_t = scale if bias is None else bias.contiguous()  # never read without bias
    flags = {"HAS_BIAS": bias is not None, "TERNARY": mask is not None, "EPILOGUE": ep.kernel_function(steps)}
    args = (x2, signs, mask_t, scale, bias_t, y)
    extra_args = ep.pointer_args(extras, out_shape, scale)
    if m <= GEMV_MAX_ROWS:
        if interpreted():
            grid = (triton.cdiv(n, _GEMV_INTERPRETED["BLOCK_N"]), m)
            _gemv_kernel[grid](*args, n, k, kw, x2.stride(0), y.stride(0), *extra_args, **flags, **_GEMV_INTERPRETED)
        else:
            grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), m)  # noqa: E731
            _gemv_tuned[grid](*args, n, k, kw, x2.stride(0), y.stride(0), *extra_args, **flags)
    else:
        flags["PRECISION"] = "ieee" if x.dtype == torch.float32 else "tf32"  # tf32 is ignored for 16-bit inputs
        if interpreted():
            c = _GEMM_INTERPRETED
            grid = (triton.cdiv(m, c["BLOCK_M"]) * triton.cdiv(n, c["BLOCK_N"]),)
            _gemm_kernel[grid](*args, m, n, k, kw, x2.stride(0), y.stride(0), *extra_args, **flags, **c)
        else:
            grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
            _gemm_tuned[grid](*args, m, n, k, kw, x2.stride(0), y.stride(0), *extra_args, **flags)
    return y.reshape(out_shape)


@torch.library.custom_op("fxopt::binary_linear", mutates_args=())
def binary_linear(x: torch.Tensor, signs: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor],
                  mask: Optional[torch.Tensor], in_features: int, extras: list[torch.Tensor], epilogue: str,
                  activations: str) -> torch.Tensor:
    """epilogue((x · Wᵀ) ⊙ scale + bias, *extras), W unpacked from `signs` (and `mask`); `epilogue`
    is a chain's JSON (codegen.epilogue); `activations` "int8" computes with x quantized per row
    (codegen.binary_cpu). See the module docstring."""
    steps = _checked_steps(epilogue, extras, activations)
    run = pick(x, binary_linear_triton, binary_linear_reference, binary_linear_cpu if available() else None)
    if run is binary_linear_cpu:
        return run(x, signs, scale, bias, mask, in_features, extras, steps, activations)
    if activations == "int8":
        x = fake_quantize(x)
    return run(x, signs, scale, bias, mask, in_features, extras, steps)


@direct_call(torch.ops.fxopt.binary_linear.default)
def binary_linear_call(x: torch.Tensor, signs: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor],
                       mask: Optional[torch.Tensor], in_features: int, extras: list[torch.Tensor], epilogue: str,
                       activations: str) -> torch.Tensor:
    """What a packed layer calls: the op, except for plain CPU tensors in eager inference, where
    the op's own dispatch (custom-op and autograd wrappers, about 35 µs a call on the 2-core VM)
    outweighs a small layer's arithmetic: there its CPU implementation runs directly, the same
    function the op would run. Anything that records or differentiates (Dynamo, torch.export,
    make_fx and other dispatch modes, tensor subclasses, functorch, an input that needs a gradient)
    sees the op."""
    if _eager_inference_on_cpu(x, extras):
        steps = _checked_steps(epilogue, extras, activations)
        return binary_linear_cpu(x, signs, scale, bias, mask, in_features, extras, steps, activations)
    return binary_linear(x, signs, scale, bias, mask, in_features, extras, epilogue, activations)


def _checked_steps(epilogue: str, extras: list[torch.Tensor], activations: str) -> ep.Steps:
    """The epilogue's steps, after checking the op's string arguments against what it was given."""
    steps = ep.decode(epilogue)
    if ep.extras_used(steps) > len(extras):
        raise ValueError(f"binary_linear: epilogue {epilogue} reads {ep.extras_used(steps)} extras, got {len(extras)}")
    if activations not in ACTIVATIONS:
        raise ValueError(f"binary_linear: activations must be one of {', '.join(ACTIVATIONS)}, got {activations!r}")
    return steps


def _eager_inference_on_cpu(x: torch.Tensor, extras: list[torch.Tensor]) -> bool:
    return (x.is_cpu and eager_inference([x, *extras] if extras else [x])
            and pick(x, None, None, binary_linear_cpu if available() else None) is binary_linear_cpu)


@binary_linear.register_fake
def _(x, signs, scale, bias, mask, in_features, extras, epilogue, activations):
    return x.new_empty((*x.shape[:-1], signs.shape[0]))


def _setup(ctx, inputs, output):
    x, signs, scale, bias, mask, in_features, extras, epilogue, _ = inputs
    ctx.save_for_backward(x, signs, scale, bias, mask, *extras)
    ctx.in_features, ctx.epilogue = in_features, epilogue


def _backward(ctx, grad):
    """Gradients for x and the epilogue's extra tensors (the packed weights are constants):
    back through the chain by autograd on its torch steps, then dx = (dz ⊙ α) · W."""
    x, signs, scale, bias, mask, *extras = ctx.saved_tensors
    steps = ep.decode(ctx.epilogue)
    d_extras = [None] * len(extras)
    if steps:
        with torch.enable_grad():
            z = binary_linear(x.detach(), signs, scale, bias, mask, ctx.in_features, [], "", "exact").requires_grad_()
            leaves = [e.detach().requires_grad_(e.is_floating_point()) for e in extras]
            wanted = [z] + [e for e in leaves if e.requires_grad]
            grads = torch.autograd.grad(ep.apply(z, steps, leaves), wanted, grad, allow_unused=True)
        grad, rest = grads[0], iter(grads[1:])
        d_extras = [next(rest) if e.requires_grad else None for e in leaves]
    w = unpack_weight(signs, mask, ctx.in_features, grad.dtype)
    # int8 activations get the straight-through gradient (that of exact ones)
    return (grad.contiguous() * scale.to(grad.dtype)) @ w, None, None, None, None, None, d_extras, None, None


binary_linear.register_autograd(_backward, setup_context=_setup)


_scaled = WeakIdKeyDictionary()  # signs → (state key, α-scaled dense weight)


def _scaled_weight(signs, scale, mask, shape, dtype) -> torch.Tensor:
    """α ⊙ W of packed planes, in `shape`, unpacked on first use and kept (in `_scaled`, weakly
    keyed by `signs`; again when the planes or α change in place): the tensor itself, which
    callers must not hand out."""
    k = math.prod(shape[1:])
    state = (*planes_state(signs, mask, k), scale._version, dtype)
    make = lambda: unpack_weight(signs, mask, k, dtype) * scale.to(dtype)[:, None]  # noqa: E731
    return kept(_scaled, signs, state, make).view(shape)


@torch.library.custom_op("fxopt::binary_weight", mutates_args=())
def binary_weight(signs: torch.Tensor, scale: torch.Tensor, mask: Optional[torch.Tensor], in_features: int,
                  dtype: torch.dtype) -> torch.Tensor:
    """The dense (out, in_features) weight α ⊙ W of packed planes, for a packed convolution. It is
    unpacked once per weight tensor (and again when the planes or α change in place) and kept in a
    table keyed weakly by `signs`; each call returns a copy, so nothing downstream can alter it."""
    # never the kept tensor: Inductor may reuse a dead output's buffer
    return _scaled_weight(signs, scale, mask, [signs.shape[0], in_features], dtype).clone()


@binary_weight.register_fake
def _(signs, scale, mask, in_features, dtype):
    return signs.new_empty((signs.shape[0], in_features), dtype=dtype)


CONVS = {1: F.conv1d, 2: F.conv2d}  # by spatial dimensions, and their (input, weight) gradients:
CONV_GRADS = {1: (torch.nn.grad.conv1d_input, torch.nn.grad.conv1d_weight),
              2: (torch.nn.grad.conv2d_input, torch.nn.grad.conv2d_weight)}


@torch.library.custom_op("fxopt::binary_conv", mutates_args=())
def binary_conv(x: torch.Tensor, signs: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor],
                mask: Optional[torch.Tensor], shape: list[int], stride: list[int], padding: list[int],
                dilation: list[int], groups: int) -> torch.Tensor:
    """A packed 1-bit (or ternary) convolution: torch's convolution on α ⊙ W, which is unpacked once
    per weight and kept (`binary_weight`'s table) and used in place: no copy per call. Measured on
    the 2-core VM (128 → 128, 3×3, 8×8, batch 8): dense 427 µs, this 478 µs, binary_weight's copy
    then the convolution 516–545 µs. What remains is the custom op's own cost: its Python dispatch
    (~25 µs) and a convolution that runs ~20 µs slower inside it than outside; eager inference
    skips both (`binary_conv_call`)."""
    return _conv(x, signs, scale, bias, mask, shape, stride, padding, dilation, groups)


def _conv(x, signs, scale, bias, mask, shape, stride, padding, dilation, groups) -> torch.Tensor:
    w = _scaled_weight(signs, scale, mask, shape, x.dtype)
    b = None if bias is None else bias.to(x.dtype)
    return CONVS[len(shape) - 2](x, w, b, stride, padding, dilation, groups)


@direct_call(torch.ops.fxopt.binary_conv.default)
def binary_conv_call(x: torch.Tensor, signs: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor],
                     mask: Optional[torch.Tensor], shape: list[int], stride: list[int], padding: list[int],
                     dilation: list[int], groups: int) -> torch.Tensor:
    """What a packed convolution calls: the op, or in eager inference (as `binary_linear_call`
    decides) the op's body directly."""
    if eager_inference([x]):
        return _conv(x, signs, scale, bias, mask, shape, stride, padding, dilation, groups)
    return binary_conv(x, signs, scale, bias, mask, shape, stride, padding, dilation, groups)


@binary_conv.register_fake
def _(x, signs, scale, bias, mask, shape, stride, padding, dilation, groups):
    dims = len(shape) - 2
    sizes = [(n + 2 * p - d * (k - 1) - 1) // s + 1
             for n, k, s, p, d in zip(x.shape[-dims:], shape[2:], stride, padding, dilation)]
    return x.new_empty((*x.shape[:-dims - 1], shape[0], *sizes))


def _conv_setup(ctx, inputs, output):
    x, signs, scale, bias, mask, shape, stride, padding, dilation, groups = inputs
    ctx.save_for_backward(signs, scale, mask)
    ctx.args = (x.shape, x.dtype, shape, stride, padding, dilation, groups, bias is not None)


def _conv_backward(ctx, grad):
    """The gradient for x (and the bias): the transposed convolution with α ⊙ W; none for the
    packed planes or α (a packed layer is for inference: train its unpacked form)."""
    signs, scale, mask = ctx.saved_tensors
    x_shape, dtype, shape, stride, padding, dilation, groups, has_bias = ctx.args
    w = _scaled_weight(signs, scale, mask, shape, dtype)
    conv_input = CONV_GRADS[len(shape) - 2][0]
    unbatched = len(x_shape) == len(shape) - 1
    g = grad.unsqueeze(0) if unbatched else grad
    dx = conv_input((1, *x_shape) if unbatched else x_shape, w, g, stride, padding, dilation, groups)
    dbias = g.sum([0, *range(2, g.dim())]) if has_bias else None
    return (dx.squeeze(0) if unbatched else dx), None, None, dbias, None, None, None, None, None, None


binary_conv.register_autograd(_conv_backward, setup_context=_conv_setup)
