"""Bottleneck substitute: against the original convolution, and against Tucker-2 (HOSVD start,
HOOI sweeps that never increase the error, the core as the projection of W)."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fxopt.substitutes import Decline, get
from fxopt.substitutes.bottleneck import BottleneckConv, tucker2

from test_separable import CONFIGS


@pytest.mark.parametrize("dims, cin, cout, k, stride, padding, dilation", CONFIGS)
def test_no_reduction_reproduces_the_original_conv(dims, cin, cout, k, stride, padding, dilation):
    torch.manual_seed(0)
    conv = (nn.Conv1d if dims == 1 else nn.Conv2d)(cin, cout, k, stride, padding, dilation).double()
    sub = BottleneckConv.from_original(conv, reduction=1, max_flops_ratio=None)
    x = torch.randn(2, cin, *([9] * dims), dtype=torch.float64)
    torch.testing.assert_close(sub(x), conv(x), rtol=1e-9, atol=1e-9)
    assert sub.reconstruction_error < 1e-9


def test_tucker2_projection_and_hooi_never_worse():
    torch.manual_seed(0)
    w = torch.randn(24, 16, 3, 3, dtype=torch.float64)
    errors = [tucker2(w, 6, 4, sweeps)[3] for sweeps in (0, 1, 5)]
    assert errors[0] >= errors[1] - 1e-12 >= errors[2] - 2e-12
    core, u_out, u_in, err = tucker2(w, 6, 4, 5)
    torch.testing.assert_close(u_out.T @ u_out, torch.eye(6, dtype=torch.float64))  # orthonormal factors
    torch.testing.assert_close(u_in.T @ u_in, torch.eye(4, dtype=torch.float64))
    # the core is W projected on both factor spaces
    torch.testing.assert_close(core, torch.einsum("oik,or,is->rsk", w.reshape(24, 16, 9), u_out, u_in))
    approx = torch.einsum("rsk,or,is->oik", core, u_out, u_in).reshape_as(w)
    assert err == pytest.approx(((w - approx).norm() / w.norm()).item())


def test_module_applies_its_tucker_weight():
    torch.manual_seed(1)
    conv = nn.Conv2d(16, 32, 3, stride=2, padding=1).double()
    sub = BottleneckConv.from_original(conv, reduction=4, max_flops_ratio=None)
    assert sub.ranks == (4, 8)
    x = torch.randn(2, 16, 10, 10, dtype=torch.float64)
    torch.testing.assert_close(sub(x), F.conv2d(x, sub.dense_weight(), conv.bias, 2, 1))
    err = ((sub.dense_weight() - conv.weight).norm() / conv.weight.norm()).item()
    assert sub.reconstruction_error == pytest.approx(err)


def test_flops_and_declines():
    conv = nn.Conv2d(64, 64, 3, padding=1)
    sub = get("bottleneck").build(conv, get("bottleneck").parse_params({}))
    x = torch.Size([1, 64, 8, 8])
    assert sub.flops(x, x) == 2 * 64 * (64 * 16 + 16 * 16 * 9 + 16 * 64)
    assert sub.flops(x, x) < 0.5 * 2 * 64 * 64 * 64 * 9
    with pytest.raises(Decline, match="max_flops_ratio"):
        BottleneckConv.from_original(nn.Conv2d(8, 8, 3), reduction=1.5)
    with pytest.raises(Decline, match="grouped"):
        BottleneckConv.from_original(nn.Conv2d(8, 8, 3, groups=4))
    with pytest.raises(ValueError):
        get("bottleneck").parse_params({"reduction": 0.5})
    assert math.isclose(get("bottleneck").parse_params({"reduction": 1})["reduction"], 1.0)
