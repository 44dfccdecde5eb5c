"""Kronecker-sum matmul: y = epilogue(vec(Σ_r A_r · X · B_rᵀ) + b), one kernel, intermediate on chip.

For each input row x (n1·n2 values, seen as X: n1 × n2, row-major) the layer's output is
Y = Σ_r A_r·X·B_rᵀ (m1 × m2), which is (Σ_r A_r ⊗ B_r)·x without ever forming the m × n weight.
The op `fxopt::kron_linear(x, A, B, bias, extras, epilogue)` is what `KronLinear` calls; the
registry (`codegen.registry`) picks the implementation:

* torch reference: two GEMMs over all rows (A first: R·m1·n2·(n1 + m2) MACs per row), bias, then
  the epilogue chain in torch (codegen.epilogue.apply); `kron_linear_torch`, what runs on CPU, is
  the same in row chunks when the intermediate would leave the cache;
* Triton: one program per (block of rows, m1-block, m2-block). For each row and each term r it
  forms T = A_r[i1-block, :]·X one n2-block at a time and immediately contracts it with B_r,
  acc += T·B_r[i2-block, n2-block]ᵀ, so T (the intermediate of the two GEMMs) lives in registers
  and never reaches global memory; bias and the generated epilogue (codegen.epilogue, a constexpr
  hook) run on the fp32 accumulator before the one store. Memory traffic is x and y once, plus the
  factors (R·(m1·n1 + m2·n2) values, L2-resident). Tile sizes are autotuned on a GPU.

Backward is a documented composition of GEMMs in torch (einsum → bmm), for x, A, B, bias and the
epilogue's extra tensors:

    G = dL/dY (per row, m1 × m2, after the epilogue's own backward, which autograd derives from
    the torch chain)
    GB = G·B_r            dX = Σ_r A_rᵀ·GB_r        dA_r = Σ_rows GB_r·Xᵀ
    AX = A_r·X            dB_r = Σ_rows Gᵀ·AX_r      d bias = Σ_rows G

fp32 inputs use IEEE fp32 dot products (not TF32); 16-bit inputs accumulate in fp32 and round T to
the input dtype before the second product, as the reference's two GEMMs do.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import epilogue as ep
from .registry import HAVE_TRITON, eager_inference, interpreted, pick


def kron_linear_reference(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, bias: Optional[torch.Tensor],
                          extras: list[torch.Tensor], steps: ep.Steps) -> torch.Tensor:
    """Plain torch: the oracle every implementation is tested against."""
    return _finish(_rows(x.reshape(-1, a.shape[2] * b.shape[2]), a, b), x, bias, extras, steps)


def _rows(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(rows, n1·n2) → (rows, m1·m2): A against every row first, then B, with no copy between.

    A batched GEMM, [A_1; …; A_R]·X per row (rows·m1·R·n1·n2 MACs), leaves z as (row, i1, r, j2),
    which is already the (rows·m1) × (R·n2) left operand of one GEMM against B
    (rows·m1·R·n2·m2 MACs); y comes out as (row, i1, i2). B first is the same cost for square
    factors and measured no faster on CPU (it needs the mirror-image batched GEMM)."""
    r, m1, n1 = a.shape
    _, m2, n2 = b.shape
    z = torch.matmul(a.transpose(0, 1).reshape(m1 * r, n1), x.reshape(-1, n1, n2))
    return (z.reshape(-1, r * n2) @ b.permute(0, 2, 1).reshape(r * n2, m2)).reshape(-1, m1 * m2)


# The intermediate z has rows·R·m1·n2 values. Past CHUNK_ABOVE floats it no longer stays in cache
# and the layer turns memory-bound (4096×4096, rank 4, batch 1024: 3.3× dense instead of 6.2×
# on the 2-core Xeon VM), so large calls run in chunks of rows with z of about CHUNK_TARGET floats
# (2 MB: within a core's L2). On the 2-core EPYC VM, against the earlier 8 M / 2 M floats:
# 4096 → 11008 rank 1 batch 1024 79 → 56 ms, 4096×4096 rank 1 batch 1024 18.8 → 17.7 ms, rank 4
# batch 256 9.4 → 8.7 ms; calls under 1 M floats unchanged.
CHUNK_ABOVE = 2**20
CHUNK_TARGET = 2**19


def row_chunk(rows: int, per_row: int) -> Optional[int]:
    """Rows per chunk for a call of `rows` rows whose intermediate holds `per_row` floats per row;
    None: one pass. A function of the shape alone, so a compiled or exported graph bakes it in once
    per shape (no timing at run time)."""
    if rows * per_row <= CHUNK_ABOVE:
        return None
    return max(1, CHUNK_TARGET // per_row)


def kron_linear_torch(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, bias: Optional[torch.Tensor],
                      extras: list[torch.Tensor], steps: ep.Steps) -> torch.Tensor:
    """The CPU path: the reference's two contractions, in row chunks when the intermediate is large
    (`row_chunk`). Plain torch, so Inductor and torch.export see through it; a symbolic row count
    (a graph exported with a dynamic batch) takes one pass."""
    r, m1, n1 = a.shape
    n2 = b.shape[2]
    flat = x.reshape(-1, n1 * n2)
    rows = flat.shape[0]
    fused = bias is not None and bias.dtype == x.dtype  # else _finish adds it, promoting as elsewhere
    if isinstance(rows, int) and rows == 1:
        return _finish(_one_row(flat, a, b, bias if fused else None), x, None if fused else bias, extras, steps)
    chunk = row_chunk(rows, r * m1 * n2) if isinstance(rows, int) else None
    if chunk is None:
        y = _rows(flat, a, b)
    elif not eager_inference([flat], (a, b, bias)):  # traced or differentiated: no out=; Inductor fuses the cat
        y = torch.cat([_rows(flat[i:i + chunk], a, b) for i in range(0, rows, chunk)])
    else:
        y = _rows_into_one_output(flat, a, b, bias if fused else None, chunk)
        bias = None if fused else bias
    return _finish(y, x, bias, extras, steps)


def _rows_into_one_output(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, bias: Optional[torch.Tensor],
                          chunk: int) -> torch.Tensor:
    """`_rows` chunk by chunk for an eager call that autograd does not record: both GEMMs write
    through `out=` (the intermediate into one reused buffer, each chunk's result straight into its
    rows of the output, so no concatenation pass) and the bias (of x's dtype) is added while the
    chunk is still in cache. 4096×4096, 64×64 factors, rank 1, batch 1024 on the 2-core EPYC VM,
    interleaved: 10.2 → 8.0 ms (min), 11.2 → 9.5 ms (median); the two GEMMs alone take ~6 ms."""
    r, m1, n1 = a.shape
    _, m2, n2 = b.shape
    rows = x.shape[0]
    at, bt = a.transpose(0, 1).reshape(m1 * r, n1), b.permute(0, 2, 1).reshape(r * n2, m2)
    y = x.new_empty(rows, m1 * m2)
    z = x.new_empty(chunk, m1 * r, n2)
    for i in range(0, rows, chunk):
        c = min(chunk, rows - i)
        zc = torch.matmul(at, x[i:i + c].reshape(c, n1, n2), out=z[:c])
        yc = y[i:i + c]
        torch.mm(zc.reshape(c * m1, r * n2), bt, out=yc.view(c * m1, m2))
        if bias is not None:
            yc.add_(bias)
    return y


def _one_row(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """One row (batch-1 decoding) → (1, m1·m2): two plain GEMMs on the row as an n1 × n2 matrix, a
    bias (of x's dtype) added by the second (addmm), with none of the batched path's broadcasting:
    at 4096×4096 with 64×64 factors, rank 1, 55 → 36 µs on the 2-core VM (dense: 1.2-4 ms)."""
    r, m1, n1 = a.shape
    _, m2, n2 = b.shape
    z = a.transpose(0, 1).reshape(m1 * r, n1) @ x.reshape(n1, n2)  # (i1, r, j2): a view for rank 1
    z, bt = z.reshape(m1, r * n2), b.permute(0, 2, 1).reshape(r * n2, m2)
    y = z @ bt if bias is None else torch.addmm(bias.reshape(m1, m2), z, bt)
    return y.reshape(1, m1 * m2)


def _finish(y: torch.Tensor, x: torch.Tensor, bias: Optional[torch.Tensor], extras: list[torch.Tensor],
            steps: ep.Steps) -> torch.Tensor:
    """(rows, m) back to x's leading shape, then bias (added in place: `y` is the GEMMs' fresh
    output, and a second rows × m buffer per call cost more than the GEMMs themselves at 4096 wide,
    batch 256: 5.4× → 12.2× dense's speed on the 2-core VM, the allocator's page faults) and the
    epilogue chain."""
    y = y.reshape(*x.shape[:-1], y.shape[-1])
    if bias is not None:
        y = y.add_(bias) if bias.dtype == y.dtype else y + bias  # mixed dtypes: promotion as before
    return ep.apply(y, steps, extras)


if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _kron_kernel(
        x_ptr, a_ptr, b_ptr, bias_ptr, y_ptr,
        M, M1, M2, N1, N2, R,
        stride_xm, stride_ym,
        e0, r0, c0, e1, r1, c1, e2, r2, c2, e3, r3, c3,   # the epilogue's extras (codegen.epilogue)
        HAS_BIAS: tl.constexpr, EPILOGUE: tl.constexpr, PRECISION: tl.constexpr,
        ROWS: tl.constexpr, BLOCK_M1: tl.constexpr, BLOCK_M2: tl.constexpr,
        BLOCK_N1: tl.constexpr, BLOCK_N2: tl.constexpr,
    ):
        # grid: (⌈M / ROWS⌉, ⌈m1 / BLOCK_M1⌉, ⌈m2 / BLOCK_M2⌉)
        offs_i1 = tl.program_id(1) * BLOCK_M1 + tl.arange(0, BLOCK_M1)
        offs_i2 = tl.program_id(2) * BLOCK_M2 + tl.arange(0, BLOCK_M2)
        cols = offs_i1[:, None] * M2 + offs_i2[None, :]  # y's column for each (i1, i2)
        out_mask = (offs_i1[:, None] < M1) & (offs_i2[None, :] < M2)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + cols, mask=out_mask, other=0.0).to(tl.float32)
        for rr in range(ROWS):
            row = tl.program_id(0) * ROWS + rr
            n1_live = tl.where(row < M, N1, 0)  # a row past M reads and writes nothing
            m1_live = tl.where(row < M, M1, 0)
            acc = tl.zeros((BLOCK_M1, BLOCK_M2), dtype=tl.float32)
            for r in range(R):
                for j2 in range(0, N2, BLOCK_N2):
                    offs_j2 = j2 + tl.arange(0, BLOCK_N2)
                    t = tl.zeros((BLOCK_M1, BLOCK_N2), dtype=tl.float32)
                    for j1 in range(0, N1, BLOCK_N1):  # T = A_r[i1, :]·X[:, j2-block]: on chip only
                        offs_j1 = j1 + tl.arange(0, BLOCK_N1)
                        a = tl.load(a_ptr + r * M1 * N1 + offs_i1[:, None] * N1 + offs_j1[None, :],
                                    mask=(offs_i1[:, None] < M1) & (offs_j1[None, :] < N1), other=0.0)
                        xt = tl.load(x_ptr + row * stride_xm + offs_j1[:, None] * N2 + offs_j2[None, :],
                                     mask=(offs_j1[:, None] < n1_live) & (offs_j2[None, :] < N2), other=0.0)
                        t = tl.dot(a, xt, t, input_precision=PRECISION)
                    b = tl.load(b_ptr + r * M2 * N2 + offs_i2[:, None] * N2 + offs_j2[None, :],
                                mask=(offs_i2[:, None] < M2) & (offs_j2[None, :] < N2), other=0.0)
                    acc = tl.dot(t.to(b.dtype), tl.trans(b), acc, input_precision=PRECISION)
            if HAS_BIAS:
                acc = acc + bias
            mask = (offs_i1[:, None] < m1_live) & (offs_i2[None, :] < M2)
            acc = EPILOGUE(acc, row, cols, mask, e0, r0, c0, e1, r1, c1, e2, r2, c2, e3, r3, c3)
            tl.store(y_ptr + row * stride_ym + cols, acc.to(y_ptr.dtype.element_ty), mask=mask)

    _CONFIGS = [
        triton.Config({"ROWS": rows, "BLOCK_M1": bm, "BLOCK_M2": bm, "BLOCK_N1": bn, "BLOCK_N2": bn},
                      num_warps=w, num_stages=s)
        for rows, bm, bn, w, s in [
            (1, 64, 64, 4, 2), (2, 64, 64, 4, 2), (4, 64, 64, 4, 2), (8, 64, 64, 8, 2),
            (4, 64, 32, 4, 3), (1, 32, 64, 4, 2), (4, 32, 32, 4, 2), (1, 128, 64, 8, 2),
        ]
    ]
    _kron_tuned = triton.autotune(_CONFIGS, key=["M", "M1", "M2", "N1", "N2", "R"])(_kron_kernel)
    # The interpreter cannot time configs: one small fixed tile, so tails and tile loops are exercised.
    _INTERPRETED = {"ROWS": 2, "BLOCK_M1": 16, "BLOCK_M2": 16, "BLOCK_N1": 16, "BLOCK_N2": 16}


def kron_linear_triton(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, bias: Optional[torch.Tensor],
                       extras: list[torch.Tensor], steps: ep.Steps) -> torch.Tensor:
    """Launcher: check → allocate → launch."""
    r, m1, n1 = a.shape
    _, m2, n2 = b.shape
    if b.shape[0] != r or x.shape[-1] != n1 * n2 or (bias is not None and bias.shape != (m1 * m2,)):
        raise ValueError(f"kron_linear: x {tuple(x.shape)}, A {tuple(a.shape)}, B {tuple(b.shape)} do not fit")
    if not (x.dtype == a.dtype == b.dtype):
        raise ValueError(f"kron_linear: x, A, B must share a dtype (got {x.dtype}, {a.dtype}, {b.dtype})")
    x2 = x.reshape(-1, n1 * n2).contiguous()
    rows = x2.shape[0]
    y = torch.empty(rows, m1 * m2, dtype=x.dtype, device=x.device)
    out_shape = (*x.shape[:-1], m1 * m2)
    if rows == 0:
        return y.reshape(out_shape)
    a, b = a.contiguous(), b.contiguous()
    bias_t = a if bias is None else bias.contiguous()  # never read without bias
    args = (x2, a, b, bias_t, y, rows, m1, m2, n1, n2, r, x2.stride(0), y.stride(0),
            *ep.pointer_args(extras, out_shape, a))
    flags = {"HAS_BIAS": bias is not None, "EPILOGUE": ep.kernel_function(steps),
             "PRECISION": "ieee" if x.dtype == torch.float32 else "tf32"}  # tf32 is ignored for 16-bit inputs
    if interpreted():
        c = _INTERPRETED
        grid = (triton.cdiv(rows, c["ROWS"]), triton.cdiv(m1, c["BLOCK_M1"]), triton.cdiv(m2, c["BLOCK_M2"]))
        _kron_kernel[grid](*args, **flags, **c)
    else:
        grid = lambda meta: (triton.cdiv(rows, meta["ROWS"]), triton.cdiv(m1, meta["BLOCK_M1"]),  # noqa: E731
                             triton.cdiv(m2, meta["BLOCK_M2"]))
        _kron_tuned[grid](*args, **flags)
    return y.reshape(out_shape)


@torch.library.custom_op("fxopt::kron_linear", mutates_args=())
def kron_linear(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, bias: Optional[torch.Tensor],
                extras: list[torch.Tensor], epilogue: str) -> torch.Tensor:
    """epilogue(x·(Σ_r A_r ⊗ B_r)ᵀ + bias, *extras); `epilogue` is a chain's JSON (codegen.epilogue)."""
    steps = ep.decode(epilogue)
    if ep.extras_used(steps) > len(extras):
        raise ValueError(f"kron_linear: epilogue {epilogue} reads {ep.extras_used(steps)} extras, got {len(extras)}")
    return pick(x, kron_linear_triton, kron_linear_torch)(x, a, b, bias, extras, steps)


@kron_linear.register_fake
def _(x, a, b, bias, extras, epilogue):
    return x.new_empty((*x.shape[:-1], a.shape[1] * b.shape[1]))


def _setup(ctx, inputs, output):
    x, a, b, bias, extras, epilogue = inputs
    ctx.save_for_backward(x, a, b, bias, *extras)
    ctx.epilogue = epilogue


def _backward(ctx, grad):
    x, a, b, bias, *extras = ctx.saved_tensors
    steps = ep.decode(ctx.epilogue)
    d_extras = [None] * len(extras)
    if steps:  # back through the chain: recompute its input, let autograd differentiate the torch steps
        with torch.enable_grad():
            z = kron_linear(x.detach(), a.detach(), b.detach(), None if bias is None else bias.detach(), [], "")
            z.requires_grad_()
            leaves = [e.detach().requires_grad_(e.is_floating_point()) for e in extras]
            wanted = [z] + [e for e in leaves if e.requires_grad]
            grads = torch.autograd.grad(ep.apply(z, steps, leaves), wanted, grad, allow_unused=True)
        grad, rest = grads[0], iter(grads[1:])
        d_extras = [next(rest) if e.requires_grad else None for e in leaves]
    r, m1, n1 = a.shape
    _, m2, n2 = b.shape
    g = grad.reshape(-1, m1, m2).to(x.dtype)
    xs = x.reshape(-1, n1, n2)
    gb = torch.einsum("nik,rkl->nirl", g, b)            # G·B_r: N·m1·m2·R·n2 MACs
    dx = torch.einsum("rij,nirl->njl", a, gb).reshape(x.shape)
    da = torch.einsum("nirl,njl->rij", gb, xs)
    ax = torch.einsum("rij,njl->nril", a, xs)           # the forward's intermediate, recomputed
    db = torch.einsum("nik,nril->rkl", g, ax)
    dbias = None if bias is None else g.reshape(-1, m1 * m2).sum(0).to(bias.dtype)
    return dx, da, db, dbias, d_extras, None


kron_linear.register_autograd(_backward, setup_context=_setup)
