"""Kernels of the `wta_hash` substitute: WTA codes, candidate selection, and the gathered matmul.

Each op has a torch reference (the oracle, and the fast path on a CPU) and, where a GPU wants one,
a Triton kernel (chosen by `codegen.registry` for CUDA tensors):

* `fxopt::wta_codes(x, windows)` → (N, L) int64: per window of K coordinates, the position of the
  largest (first one on ties, like `argmax`). One program per (block of rows, block of windows),
  a running max over the K positions.
* `fxopt::collision_counts(qkeys, row_keys)` → (N, C) int32: for each query and each row, the
  number of bands whose bucket keys agree. The GPU's way of finding candidates: B·C·bands integer
  compares and a `topk`, where the CPU reads only the query's buckets (`band_tables`).
* `fxopt::wta_select(qkeys, row_keys, order, starts, buckets, budget, cap)` → (rows, valid),
  each (N, budget): the rows sharing the most bands with each query, best first. CPU: per-band
  tables of the rows sorted by bucket (`band_tables`; CSR `order`/`starts`), so a query reads only
  its own buckets (at most `cap` rows from each), then numpy sorts count and rank the hits (its
  vectorised sort is far faster than torch's on these small integer arrays). Any other device:
  `collision_counts` of all rows and a `topk`. A query with fewer candidates than the budget has
  its tail marked invalid (those rows repeat row 0 and must be ignored).
* `fxopt::gathered_linear(x, weight, bias, rows)` → (N, c): out[n, j] = x[n] · weight[rows[n, j]]
  + bias[rows[n, j]], each query against its own c rows; reads N·c·D weights instead of C·D.
  Backward: grad_x[n] = Σ_j g[n, j] · weight[rows[n, j]] (a second kernel, same gather), and the
  weight and bias gradients as *sparse* COO tensors holding one row per (n, j), so neither a dense
  (C, D) gradient nor a dense optimizer update is ever made (use `torch.optim.SGD` or
  `torch.optim.SparseAdam` for the wide layer). The row gradients are the outer products
  g[n, j] · x[n] (a broadcast multiply in torch: nothing to gather, nothing to fuse).
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from .registry import HAVE_TRITON, interpreted, pick, wants_triton

_CHUNK = 1 << 24  # elements of a temporary in the references: bounds their memory for wide layers


def wta_codes_reference(x: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
    """argmax over x[:, windows[l]] for every window l, in row chunks. (`max(-1).indices`, which
    also returns the first maximum, is a fifth faster than `argmax(-1)` on CPU.)"""
    n, (length, k) = x.shape[0], windows.shape
    step = max(1, _CHUNK // max(1, length * k))
    flat = windows.reshape(-1)
    return torch.cat([x[i:i + step].index_select(1, flat).view(-1, length, k).max(-1).indices
                      for i in range(0, n, step)]) if n else x.new_zeros((0, length), dtype=torch.long)


def collision_counts_reference(qkeys: torch.Tensor, row_keys: torch.Tensor) -> torch.Tensor:
    """Σ_band [qkeys[n, band] == row_keys[c, band]], in row chunks."""
    n, bands = qkeys.shape
    step = max(1, _CHUNK // max(1, n * bands))
    q = qkeys[:, None, :]
    return torch.cat([(q == row_keys[None, i:i + step]).sum(-1, dtype=torch.int32)
                      for i in range(0, row_keys.shape[0], step)], 1)


def band_tables(keys: torch.Tensor, buckets: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per band, the rows sorted by bucket key (ties by row), flat and band-major: with B buckets
    per band, the rows in bucket q of band j are order[starts[j·B + q] : starts[j·B + q + 1]].
    `order` is (bands · C,) int32, `starts` (bands · B + 1,) int64. CPU tensors. numpy's stable
    sort is a radix sort on 16-bit keys (B ≤ 65,536: 0.4 s for 96 bands × 500k rows, where
    torch.sort takes 13 s), a merge sort otherwise."""
    rows, bands = keys.shape
    k = keys.t().contiguous().numpy()
    order = np.argsort(k.astype(np.uint16) if buckets <= 1 << 16 else k, axis=1, kind="stable")
    flat = np.int32 if bands * buckets < 2 ** 31 else np.int64
    offset = k.astype(flat) + (np.arange(bands, dtype=flat) * buckets)[:, None]
    starts = torch.zeros(bands * buckets + 1, dtype=torch.long)
    torch.cumsum(torch.from_numpy(np.bincount(offset.reshape(-1), minlength=bands * buckets)), 0, out=starts[1:])
    return torch.from_numpy(order.reshape(-1).astype(np.int32)), starts


def select_reference(qkeys: torch.Tensor, num_rows: int, order: torch.Tensor, starts: torch.Tensor, buckets: int,
                     budget: int, cap: Optional[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidates from the tables (CPU tensors): every (query, row) pair sharing a bucket, counted
    and ranked by count, ties by row. In numpy, whose vectorised sort is an order of magnitude
    faster than torch's on these small integer arrays (6k keys: 17 µs against 300 µs here)."""
    n, bands = qkeys.shape
    q = (qkeys.long() + torch.arange(0, bands * buckets, buckets)).reshape(-1).numpy()
    table = starts.numpy()
    start = table[q]
    length = table[q + 1] - start
    if cap is not None:  # a crowded bucket contributes its first `cap` rows
        np.minimum(length, cap, out=length)
    # position in `order` of every hit: its bucket's start + its rank among that bucket's hits
    ends = np.cumsum(length)
    pos = np.arange(ends[-1] if ends.size else 0) + np.repeat(start + length - ends, length)
    query = np.repeat(np.arange(n), length.reshape(n, bands).sum(1))
    wide = np.int64 if n * num_rows * (bands + 1) >= 2 ** 31 else np.int32
    pair, count = np.unique(query.astype(wide) * num_rows + order.numpy()[pos], return_counts=True)
    query, row = np.divmod(pair, num_rows)
    # One sort ranks everything: key (query, bands − count, row), decoded after.
    key = np.sort((query * (bands + 1) + (bands - count.astype(wide))) * num_rows + row)
    rest, row = np.divmod(key, num_rows)
    query = rest // (bands + 1)
    rank = np.arange(key.size) - np.searchsorted(query, np.arange(n))[query]
    keep = rank < budget
    at = (query[keep], rank[keep])
    rows = np.zeros((n, budget), dtype=np.int64)
    valid = np.zeros((n, budget), dtype=bool)
    rows[at] = row[keep]
    valid[at] = True
    return torch.from_numpy(rows), torch.from_numpy(valid)


def gathered_linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                              rows: torch.Tensor) -> torch.Tensor:
    """One batched matmul over the gathered rows: (N, c, D) · (N, D, 1)."""
    out = torch.bmm(F.embedding(rows, weight), x.unsqueeze(-1)).squeeze(-1)
    return out + bias[rows] if bias is not None else out


def gathered_grad_input_reference(grad: torch.Tensor, weight: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    return torch.bmm(grad.unsqueeze(1), F.embedding(rows, weight)).squeeze(1)


if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _codes_kernel(x_ptr, win_ptr, out_ptr, N, L, stride_x,
                      K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr):
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_l = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
        mask_l = offs_l < L
        mask = (offs_n[:, None] < N) & mask_l[None, :]
        best = tl.full((BLOCK_N, BLOCK_L), float("-inf"), tl.float32)
        code = tl.zeros((BLOCK_N, BLOCK_L), tl.int64)
        for k in tl.static_range(K):  # running argmax; strict > keeps the first maximum, as argmax does
            col = tl.load(win_ptr + offs_l * K + k, mask=mask_l, other=0)
            v = tl.load(x_ptr + offs_n[:, None] * stride_x + col[None, :], mask=mask, other=0.0).to(tl.float32)
            take = v > best
            best = tl.where(take, v, best)
            code = tl.where(take, k, code)
        tl.store(out_ptr + offs_n[:, None] * L + offs_l[None, :], code, mask=mask)

    @triton.jit
    def _collisions_kernel(q_ptr, r_ptr, out_ptr, N, C, BANDS, stride_q, stride_r,
                           BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        mask_n, mask_c = offs_n < N, offs_c < C
        count = tl.zeros((BLOCK_N, BLOCK_C), tl.int32)
        for j in range(BANDS):
            qk = tl.load(q_ptr + offs_n * stride_q + j, mask=mask_n, other=-1)
            rk = tl.load(r_ptr + offs_c * stride_r + j, mask=mask_c, other=-2)
            count += (qk[:, None] == rk[None, :]).to(tl.int32)
        tl.store(out_ptr + offs_n[:, None] * C + offs_c[None, :], count, mask=mask_n[:, None] & mask_c[None, :])

    @triton.jit
    def _gathered_kernel(x_ptr, w_ptr, b_ptr, rows_ptr, out_ptr, CAND, D, stride_x, stride_w,
                         HAS_BIAS: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr):
        """out[n, j] = x[n] · w[rows[n, j]] (+ b[rows[n, j]]): one program per (query, block of rows)."""
        n = tl.program_id(0)
        offs_j = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
        mask_j = offs_j < CAND
        rows = tl.load(rows_ptr + n * CAND + offs_j, mask=mask_j, other=0).to(tl.int64)
        acc = tl.zeros((BLOCK_J,), tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            mask_d = offs_d < D
            xv = tl.load(x_ptr + n * stride_x + offs_d, mask=mask_d, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + rows[:, None] * stride_w + offs_d[None, :],
                        mask=mask_j[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(w * xv[None, :], 1)
        if HAS_BIAS:
            acc += tl.load(b_ptr + rows, mask=mask_j, other=0.0).to(tl.float32)
        tl.store(out_ptr + n * CAND + offs_j, acc.to(out_ptr.dtype.element_ty), mask=mask_j)

    @triton.jit
    def _gathered_grad_input_kernel(g_ptr, w_ptr, rows_ptr, out_ptr, CAND, D, stride_w,
                                    BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr):
        """grad_x[n, d] = Σ_j g[n, j] · w[rows[n, j], d]: one program per (query, block of columns)."""
        n = tl.program_id(0)
        offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        acc = tl.zeros((BLOCK_D,), tl.float32)
        for j0 in range(0, CAND, BLOCK_J):
            offs_j = j0 + tl.arange(0, BLOCK_J)
            mask_j = offs_j < CAND
            rows = tl.load(rows_ptr + n * CAND + offs_j, mask=mask_j, other=0).to(tl.int64)
            g = tl.load(g_ptr + n * CAND + offs_j, mask=mask_j, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + rows[:, None] * stride_w + offs_d[None, :],
                        mask=mask_j[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(w * g[:, None], 0)
        tl.store(out_ptr + n * D + offs_d, acc.to(out_ptr.dtype.element_ty), mask=mask_d)

    # Small tiles under the interpreter (slow, and masked tails must be exercised); on a GPU these
    # are one warp-group's worth of work per program. The GEMV-shaped kernels are memory bound.
    _TILES = {"codes": (16, 16), "collisions": (16, 64), "gathered": (32, 128)}
    _TILES_INTERPRETED = {"codes": (4, 8), "collisions": (4, 16), "gathered": (8, 16)}


def _tiles(name: str) -> tuple[int, int]:
    return (_TILES_INTERPRETED if interpreted() else _TILES)[name]


def _check_2d(name: str, **tensors: torch.Tensor) -> None:
    for what, t in tensors.items():
        if t.dim() != 2:
            raise ValueError(f"{name}: {what} must be 2-D, got shape {tuple(t.shape)}")


def wta_codes_triton(x: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
    x, windows = x.contiguous(), windows.contiguous()
    (n, _), (length, k) = x.shape, windows.shape
    out = torch.empty(n, length, dtype=torch.long, device=x.device)
    bn, bl = _tiles("codes")
    grid = (triton.cdiv(n, bn), triton.cdiv(length, bl))
    if n:
        _codes_kernel[grid](x, windows, out, n, length, x.stride(0), K=k, BLOCK_N=bn, BLOCK_L=bl)
    return out


def collision_counts_triton(qkeys: torch.Tensor, row_keys: torch.Tensor) -> torch.Tensor:
    qkeys, row_keys = qkeys.contiguous(), row_keys.contiguous()
    n, bands = qkeys.shape
    c = row_keys.shape[0]
    out = torch.empty(n, c, dtype=torch.int32, device=qkeys.device)
    bn, bc = _tiles("collisions")
    if n and c:
        grid = (triton.cdiv(n, bn), triton.cdiv(c, bc))
        _collisions_kernel[grid](qkeys, row_keys, out, n, c, bands, qkeys.stride(0), row_keys.stride(0),
                                 BLOCK_N=bn, BLOCK_C=bc)
    return out


def gathered_linear_triton(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                           rows: torch.Tensor) -> torch.Tensor:
    x, weight, rows = x.contiguous(), weight.contiguous(), rows.contiguous()
    (n, d), cand = x.shape, rows.shape[1]
    out = torch.empty(n, cand, dtype=x.dtype, device=x.device)
    bj, bd = _tiles("gathered")
    if n and cand:
        bias_t = weight if bias is None else bias.contiguous()  # never read without bias
        _gathered_kernel[(n, triton.cdiv(cand, bj))](x, weight, bias_t, rows, out, cand, d, x.stride(0), weight.stride(0),
                                                     HAS_BIAS=bias is not None, BLOCK_J=bj, BLOCK_D=bd)
    return out


def gathered_grad_input_triton(grad: torch.Tensor, weight: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    grad, weight, rows = grad.contiguous(), weight.contiguous(), rows.contiguous()
    (n, cand), d = grad.shape, weight.shape[1]
    out = torch.empty(n, d, dtype=grad.dtype, device=grad.device)
    bj, bd = _tiles("gathered")
    if n:
        _gathered_grad_input_kernel[(n, triton.cdiv(d, bd))](grad, weight, rows, out, cand, d, weight.stride(0),
                                                             BLOCK_J=bj, BLOCK_D=bd)
    return out


# --- registration ------------------------------------------------------------------------------

@torch.library.custom_op("fxopt::wta_codes", mutates_args=())
def wta_codes(x: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
    """(N, L) int64 WTA codes of the rows of x (N, D) for windows (L, K) of coordinate indices."""
    _check_2d("wta_codes", x=x, windows=windows)
    return pick(x, wta_codes_triton, wta_codes_reference)(x, windows)


@wta_codes.register_fake
def _(x, windows):
    return x.new_empty((x.shape[0], windows.shape[0]), dtype=torch.long)


@torch.library.custom_op("fxopt::collision_counts", mutates_args=())
def collision_counts(qkeys: torch.Tensor, row_keys: torch.Tensor) -> torch.Tensor:
    """(N, C) int32: how many bands of query n share row c's bucket key."""
    _check_2d("collision_counts", qkeys=qkeys, row_keys=row_keys)
    if qkeys.shape[1] != row_keys.shape[1] or qkeys.dtype != row_keys.dtype:
        raise ValueError(f"collision_counts: qkeys {tuple(qkeys.shape)} {qkeys.dtype} and row_keys "
                         f"{tuple(row_keys.shape)} {row_keys.dtype} need the same number of bands and dtype")
    return pick(qkeys, collision_counts_triton, collision_counts_reference)(qkeys, row_keys)


@collision_counts.register_fake
def _(qkeys, row_keys):
    return qkeys.new_empty((qkeys.shape[0], row_keys.shape[0]), dtype=torch.int32)


def uses_tables(x: torch.Tensor) -> bool:
    """Whether candidates for tensors like `x` come from the CPU band tables (`band_tables`,
    `select_reference`) rather than from dense collision counts (a GPU, or any non-CPU device)."""
    return x.device.type == "cpu" and not wants_triton(x)


@torch.library.custom_op("fxopt::wta_select", mutates_args=())
def wta_select(qkeys: torch.Tensor, row_keys: torch.Tensor, order: torch.Tensor, starts: torch.Tensor, buckets: int,
               budget: int, cap: Optional[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, valid), each (N, budget): the rows sharing the most bands with each query (N, bands)."""
    _check_2d("wta_select", qkeys=qkeys, row_keys=row_keys)
    if not uses_tables(qkeys):
        top = collision_counts(qkeys.to(row_keys.dtype), row_keys).topk(budget, dim=1)
        return top.indices, top.values > 0
    return select_reference(qkeys, row_keys.shape[0], order, starts, buckets, budget, cap)


@wta_select.register_fake
def _(qkeys, row_keys, order, starts, buckets, budget, cap):
    shape = (qkeys.shape[0], budget)
    return qkeys.new_empty(shape, dtype=torch.long), qkeys.new_empty(shape, dtype=torch.bool)


@torch.library.custom_op("fxopt::dense_fallback", mutates_args=())
def dense_fallback(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                   missing: torch.Tensor) -> torch.Tensor:
    """`out` with the rows where `missing` (N,) holds replaced by the dense logits of those inputs:
    an input that found no candidate is computed exactly rather than returned as all fill."""
    out = out.clone()
    idx = missing.nonzero().squeeze(1)
    if idx.numel():
        out[idx] = F.linear(x[idx], weight, bias).to(out.dtype)
    return out


@dense_fallback.register_fake
def _(out, x, weight, bias, missing):
    return torch.empty_like(out)


def _fallback_setup(ctx, inputs, output):
    out, x, weight, bias, missing = inputs
    ctx.save_for_backward(x, weight, missing)
    ctx.has_bias = bias is not None


def _fallback_backward(ctx, grad):
    """Replaced rows pass no gradient to `out`; their dense gradients go to x, weight and bias
    (dense in the weight: only where a fallback happened, None otherwise)."""
    x, weight, missing = ctx.saved_tensors
    idx = missing.nonzero().squeeze(1)
    keep = grad.masked_fill(missing[:, None], 0)
    if not idx.numel():
        return keep, None, None, None, None
    g = grad[idx]
    grad_x = torch.zeros_like(x).index_put((idx,), g @ weight) if ctx.needs_input_grad[1] else None
    grad_w = g.t() @ x[idx] if ctx.needs_input_grad[2] else None
    grad_b = g.sum(0) if ctx.has_bias and ctx.needs_input_grad[3] else None
    return keep, grad_x, grad_w, grad_b, None


dense_fallback.register_autograd(_fallback_backward, setup_context=_fallback_setup)


@torch.library.custom_op("fxopt::gathered_linear", mutates_args=())
def gathered_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                    rows: torch.Tensor) -> torch.Tensor:
    """out[n, j] = x[n] · weight[rows[n, j]] + bias[rows[n, j]]; x (N, D), rows (N, c) int64."""
    _check_2d("gathered_linear", x=x, weight=weight, rows=rows)
    if x.shape[1] != weight.shape[1] or rows.shape[0] != x.shape[0]:
        raise ValueError(f"gathered_linear: x {tuple(x.shape)}, weight {tuple(weight.shape)}, rows {tuple(rows.shape)} "
                         "do not fit")
    return pick(x, gathered_linear_triton, gathered_linear_reference)(x, weight, bias, rows)


@gathered_linear.register_fake
def _(x, weight, bias, rows):
    return x.new_empty(rows.shape)


def _setup(ctx, inputs, output):
    x, weight, bias, rows = inputs
    ctx.save_for_backward(x, weight, rows)
    ctx.has_bias = bias is not None


def _backward(ctx, grad):
    """grad_x by the gathered kernel; weight and bias gradients sparse, one row per (n, j)."""
    x, weight, rows = ctx.saved_tensors
    grad = grad.contiguous()
    grad_x = grad_w = grad_b = None
    if ctx.needs_input_grad[0]:
        grad_x = pick(grad, gathered_grad_input_triton, gathered_grad_input_reference)(grad, weight, rows)
    index = rows.reshape(1, -1)
    if ctx.needs_input_grad[1]:
        values = (grad.unsqueeze(-1) * x.unsqueeze(1)).reshape(-1, x.shape[1]).to(weight.dtype)
        grad_w = torch.sparse_coo_tensor(index, values, weight.shape, check_invariants=False)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        grad_b = torch.sparse_coo_tensor(index, grad.reshape(-1).to(weight.dtype), (weight.shape[0],),
                                         check_invariants=False)
    return grad_x, grad_w, grad_b, None


gathered_linear.register_autograd(_backward, setup_context=_setup)
