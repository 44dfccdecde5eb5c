"""Low-rank substitute: against the original Linear, and against Eckart–Young (the truncated
SVD is the best rank-r approximation, with error √(Σ_{k>r} σ_k²) / ‖W‖)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from fxopt.substitutes import Decline, get
from fxopt.substitutes.lowrank import LowRankLinear


@settings(max_examples=30, deadline=None)
@given(m=st.integers(1, 40), n=st.integers(1, 40), bias=st.booleans(), seed=st.integers(0, 2**16))
def test_full_rank_reproduces_the_original_linear(m, n, bias, seed):
    torch.manual_seed(seed)
    linear = nn.Linear(n, m, bias=bias).double()
    sub = LowRankLinear.from_original(linear, rank=min(m, n), max_flops_ratio=None)
    x = torch.randn(3, 2, n, dtype=torch.float64)
    torch.testing.assert_close(sub(x), linear(x), rtol=1e-9, atol=1e-9)
    assert sub.reconstruction_error < 1e-9


@pytest.mark.parametrize("rank", [1, 3, 10])
def test_truncation_is_the_eckart_young_optimum(rank):
    torch.manual_seed(0)
    linear = nn.Linear(24, 16).double()
    sub = LowRankLinear.from_original(linear, rank=rank, max_flops_ratio=None)
    u, s, vh = torch.linalg.svd(linear.weight.detach())
    best = u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank]
    torch.testing.assert_close(sub.dense_weight(), best)
    expected = (s[rank:].square().sum() / s.square().sum()).sqrt().item()
    assert sub.reconstruction_error == pytest.approx(expected, rel=1e-9)
    x = torch.randn(5, 24, dtype=torch.float64)
    torch.testing.assert_close(sub(x), x @ best.T + linear.bias)


def test_rank_from_flops_budget_and_declines():
    linear = nn.Linear(512, 256)
    sub = LowRankLinear.from_original(linear, max_flops_ratio=0.25)
    assert sub.rank == int(0.25 * 512 * 256 / (512 + 256))
    assert sub.flops(torch.Size([8, 512])) <= 0.25 * 2 * 8 * 512 * 256
    with pytest.raises(Decline, match="exceeds"):
        LowRankLinear.from_original(nn.Linear(8, 4), rank=5, max_flops_ratio=None)
    with pytest.raises(Decline, match="dense FLOPs"):
        LowRankLinear.from_original(nn.Linear(64, 64), rank=40, max_flops_ratio=0.5)
    with pytest.raises(Decline, match="rank 1 already"):
        LowRankLinear.from_original(nn.Linear(2, 2), max_flops_ratio=0.5)


def test_bias_is_copied_not_shared():
    linear = nn.Linear(32, 32)
    sub = get("lowrank").build(linear, get("lowrank").parse_params({"rank": 4}))
    with torch.no_grad():
        sub.up.bias.add_(1.0)
    assert not torch.equal(sub.up.bias, linear.bias)


def test_fit_inputs_is_the_least_squares_optimum_on_the_inputs():
    """The rank-r W' minimising ‖(W − W')X‖ is U_r·U_rᵀ·W, U_r the top-r left singular vectors of
    W·X (an independent formula: no whitening, no Gram matrix)."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(48, 32)
    x = torch.randn(48, 400, dtype=torch.float64) * torch.logspace(0, -2, 48, dtype=torch.float64)[:, None]
    sub = LowRankLinear.from_original(layer, rank=6, max_flops_ratio=None)
    plain = sub.dense_weight().double()
    sub.fit_inputs(layer, x @ x.T, damping=1e-12)
    w = layer.weight.detach().double()
    u = torch.linalg.svd(w @ x, full_matrices=False).U[:, :6]
    optimum = u @ u.T @ w
    fitted = sub.dense_weight().double()
    torch.testing.assert_close(fitted @ x, optimum @ x, rtol=1e-6, atol=1e-6)
    err = lambda v: torch.linalg.norm((w - v) @ x).item()  # noqa: E731
    assert err(fitted) < 0.8 * err(plain)  # the weight-only SVD is worse on these inputs
