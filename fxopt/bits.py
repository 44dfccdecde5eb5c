"""1-bit packing: the storage format of binarized weights, shared by the saved model and the kernels.

A weight matrix of shape (N, K) whose entries are ±1 is stored as int32 words of shape
(N, ⌈K/32⌉): bit j (least significant first) of word w in row n holds column 32·w + j, with
1 for +1 and 0 for −1. Columns past K in the last word are 0 and never read. A ternary matrix
(entries −1, 0, +1) is two such planes: the sign plane and a non-zero mask.

    >>> words = pack_signs(torch.tensor([[1., -1., 1.]]))      # 0b101
    >>> words, unpack_signs(words, 3)
    (tensor([[5]], dtype=torch.int32), tensor([[ 1., -1.,  1.]]))

32 weights per int32 is 1/32 of fp32 storage, 1/16 of bf16.

`unpack_bits` is the plain shift-and-mask definition; `unpack_signs` / `unpack_mask`, which the
torch reference of the kernel runs at every call, read each byte of the words through a
256-entry table instead (3–7× faster on CPU) and are tested against it.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

WORD = 32


def words_for(k: int) -> int:
    """Int32 words per row for k columns."""
    return -(-k // WORD)


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """(N, K) booleans → (N, ⌈K/32⌉) int32 words, column 32·w + j in bit j of word w."""
    if bits.dim() != 2:
        raise ValueError(f"pack_bits expects a 2-D tensor, got shape {tuple(bits.shape)}")
    n, k = bits.shape
    padded = torch.zeros(n, words_for(k) * WORD, dtype=torch.int64, device=bits.device)
    padded[:, :k] = bits.to(torch.int64)
    shifts = torch.arange(WORD, dtype=torch.int64, device=bits.device)
    words = (padded.view(n, -1, WORD) << shifts).sum(-1)  # 0 ≤ words < 2**32
    words = torch.where(words >= 2**31, words - 2**32, words)  # same bits, as a signed int32
    return words.to(torch.int32)


def unpack_bits(words: torch.Tensor, k: int) -> torch.Tensor:
    """(N, W) int32 words → (N, k) booleans; the inverse of `pack_bits`."""
    shifts = torch.arange(WORD, dtype=torch.int32, device=words.device)
    bits = (words.unsqueeze(-1) >> shifts) & 1  # arithmetic shift: bit 31's sign copies are masked off
    return bits.reshape(words.shape[0], -1)[:, :k].bool()


def _byte_table(zero: float, one: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(256, 8): row b holds bit i of byte b (least significant first) as `one`/`zero`. Made at each
    call from factory ops (2,048 elements): a module-level tensor, or a cache of tables, would hand
    a tracer (Dynamo's backward under fake tensors, torch.export) a real tensor it cannot use."""
    bits = (torch.arange(256, device=device)[:, None] >> torch.arange(8, device=device)) & 1
    return torch.where(bits.bool(), one, zero).to(dtype)


def _unpack_values(words: torch.Tensor, k: int, zero: float, one: float, dtype: torch.dtype) -> torch.Tensor:
    if sys.byteorder != "little":  # the byte view below assumes bits 0–7 live in the first byte
        return torch.where(unpack_bits(words, k), one, zero).to(dtype)
    table = _byte_table(zero, one, dtype, words.device)
    by_byte = F.embedding(words.contiguous().view(torch.uint8).long(), table)  # (N, 4W, 8)
    return by_byte.reshape(words.shape[0], -1)[:, :k]


def pack_signs(signs: torch.Tensor) -> torch.Tensor:
    """(N, K) ±1 values → packed words (entries ≥ 0 count as +1)."""
    return pack_bits(signs >= 0)


def unpack_signs(words: torch.Tensor, k: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Packed words → (N, k) ±1 values of `dtype`."""
    return _unpack_values(words, k, -1.0, 1.0, dtype)


def unpack_mask(words: torch.Tensor, k: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Packed words → (N, k) 0/1 values of `dtype` (a ternary layer's non-zero mask)."""
    return _unpack_values(words, k, 0.0, 1.0, dtype)


def unpack_weight(signs: torch.Tensor, mask: torch.Tensor | None, k: int, dtype: torch.dtype) -> torch.Tensor:
    """The (N, k) weight of a packed layer: ±1 from `signs`, times the non-zero `mask` if ternary."""
    w = unpack_signs(signs, k, dtype)
    return w if mask is None else w * unpack_mask(mask, k, dtype)
