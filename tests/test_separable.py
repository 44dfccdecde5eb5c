"""Separable substitute: against the original convolution, and against the per-channel SVD
optimum (the structure W[o, c] = Σ_j P[o, cμ+j]·D[cμ+j] decouples over input channels c)."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from fxopt.substitutes import Decline
from fxopt.substitutes.separable import SeparableConv

CONFIGS = [  # (dims, in, out, kernel, stride, padding, dilation)
    (2, 3, 5, 3, 1, 1, 1),
    (2, 4, 6, 3, 2, 1, 1),
    (2, 4, 4, (3, 5), 1, (1, 2), 1),
    (2, 2, 3, 3, 1, 2, 2),
    (1, 3, 4, 5, 2, 2, 1),
]


@pytest.mark.parametrize("dims, cin, cout, k, stride, padding, dilation", CONFIGS)
@pytest.mark.parametrize("bias", [True, False])
def test_full_multiplier_reproduces_the_original_conv(dims, cin, cout, k, stride, padding, dilation, bias):
    torch.manual_seed(0)
    conv = (nn.Conv1d if dims == 1 else nn.Conv2d)(cin, cout, k, stride, padding, dilation, bias=bias).double()
    kk = math.prod(conv.kernel_size)
    sub = SeparableConv.from_original(conv, multiplier=min(cout, kk), max_flops_ratio=None)
    x = torch.randn(2, cin, *([9] * dims), dtype=torch.float64)
    torch.testing.assert_close(sub(x), conv(x), rtol=1e-9, atol=1e-9)
    assert sub.reconstruction_error < 1e-9


@settings(max_examples=25, deadline=None)
@given(cin=st.integers(1, 6), cout=st.integers(1, 8), mu=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_weight_is_the_per_channel_truncated_svd(cin, cout, mu, seed):
    torch.manual_seed(seed)
    conv = nn.Conv2d(cin, cout, 3, padding=1).double()
    sub = SeparableConv.from_original(conv, multiplier=mu, max_flops_ratio=None)
    w = conv.weight.detach()
    best, discarded = torch.empty_like(w), 0.0
    for c in range(cin):
        u, s, vh = torch.linalg.svd(w[:, c].reshape(cout, 9), full_matrices=False)
        best[:, c] = (u[:, :mu] * s[:mu] @ vh[:mu]).reshape(cout, 3, 3)
        discarded += s[mu:].square().sum().item()
    torch.testing.assert_close(sub.dense_weight(), best)
    assert sub.reconstruction_error == pytest.approx(math.sqrt(discarded) / w.norm().item(), abs=1e-12)
    x = torch.randn(2, cin, 6, 6, dtype=torch.float64)  # the module applies exactly that weight
    torch.testing.assert_close(sub(x), F.conv2d(x, best, conv.bias, padding=1))


def test_flops_and_declines():
    conv = nn.Conv2d(64, 64, 3, padding=1)
    sub = SeparableConv.from_original(conv)
    x = torch.Size([2, 64, 16, 16])
    assert sub.flops(x, x) == 2 * 2 * 256 * 64 * (9 + 64)
    with pytest.raises(Decline, match="1×1"):
        SeparableConv.from_original(nn.Conv2d(8, 8, 1))
    with pytest.raises(Decline, match="grouped"):
        SeparableConv.from_original(nn.Conv2d(8, 8, 3, groups=2))
    with pytest.raises(Decline, match="max_flops_ratio"):
        SeparableConv.from_original(nn.Conv2d(8, 8, 3), multiplier=4, max_flops_ratio=0.5)
