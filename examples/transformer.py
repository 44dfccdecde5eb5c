"""A pre-norm transformer block (multi-head self-attention + GELU MLP) with a hand-written
attention projection `x @ w.t() + b`, as models written from papers often have.

    fxopt optimize examples/transformer.py --rules kron --out out/transformer
"""

import math

import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    def __init__(self, dim: int = 256, heads: int = 4, hidden: int = 1024):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv_weight = nn.Parameter(torch.randn(3 * dim, dim) / math.sqrt(dim))  # used by hand
        self.qkv_bias = nn.Parameter(torch.zeros(3 * dim))
        self.proj = nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        b, t, d = x.shape
        qkv = self.norm1(x) @ self.qkv_weight.t() + self.qkv_bias
        q, k, v = qkv.reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attn.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


def build_model() -> nn.Module:
    torch.manual_seed(0)
    return Block().eval()


def example_inputs():
    return (torch.randn(4, 16, 256, generator=torch.Generator().manual_seed(1)),)


def calibration_data():
    g = torch.Generator().manual_seed(2)
    for _ in range(2):
        yield (torch.randn(4, 16, 256, generator=g),)
