"""The truncated SVD (fxopt.linalg): the randomized path keeps what the full SVD keeps, within a
stated tolerance, and the reported error is the exact error of the factors returned."""

import math

import pytest
import torch

from fxopt import linalg
from fxopt.substitutes.kron import KronLinear, nearest_kronecker_sum
from fxopt.substitutes.lowrank import LowRankLinear


def decaying(m: int, n: int, seed: int = 0, rate: float = 0.97) -> torch.Tensor:
    """A matrix whose singular values decay geometrically, like a trained layer's."""
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(m, min(m, n), generator=g, dtype=torch.double)).Q
    v = torch.linalg.qr(torch.randn(n, min(m, n), generator=g, dtype=torch.double)).Q
    s = rate ** torch.arange(min(m, n), dtype=torch.double)
    return (u * s) @ v.T


def actual_error(m: torch.Tensor, u, s, vh) -> float:
    return ((m - (u * s) @ vh).norm() / m.norm()).item()


@pytest.mark.parametrize("shape,k", [((600, 400), 20), ((400, 900), 64), ((512, 512), 8)])
@pytest.mark.parametrize("kind", ["decaying", "gaussian"])
def test_randomized_path_keeps_what_the_full_svd_keeps(shape, k, kind):
    g = torch.Generator().manual_seed(1)
    m = decaying(*shape) if kind == "decaying" else torch.randn(*shape, generator=g, dtype=torch.double)
    assert min(shape) > linalg.FULL_BELOW and k <= linalg.SHARE * min(shape)  # the randomized path
    u, s, vh, error = linalg.top_singular(m, k)
    assert u.shape == (shape[0], k) and s.shape == (k,) and vh.shape == (k, shape[1])
    full = torch.linalg.svd(m, full_matrices=False)
    best = math.sqrt((full.S[k:].square().sum() / full.S.square().sum()).item())
    assert error == pytest.approx(actual_error(m, u, s, vh), abs=1e-10)  # exact, not estimated
    # within 0.1% of the optimal rank-k error where the spectrum decays as a trained layer's does;
    # within 1% for a Gaussian matrix (flat spectrum: the worst case of a randomized range finder)
    slack = 1e-3 if kind == "decaying" else 1e-2
    assert best <= error <= best * (1 + slack) + 1e-12
    if kind == "decaying":  # the kept singular values themselves (a flat spectrum has no gap to find)
        torch.testing.assert_close(s, full.S[:k], rtol=1e-3, atol=1e-12)


def test_small_matrices_and_large_ranks_take_the_full_svd():
    m = torch.randn(300, 200, dtype=torch.double)
    u, s, vh, error = linalg.top_singular(m, 100)  # over SHARE of 200
    full = torch.linalg.svd(m, full_matrices=False)
    torch.testing.assert_close(s, full.S[:100])
    assert error == pytest.approx(actual_error(m, u, s, vh), abs=1e-12)


def test_kron_and_lowrank_report_the_exact_error_of_what_they_build():
    torch.manual_seed(0)
    linear = torch.nn.Linear(1024, 1024)
    with torch.no_grad():
        linear.weight.copy_(decaying(1024, 1024, rate=0.99).float())
    w = linear.weight.detach().double()
    kron = KronLinear.from_original(linear, rank=8)  # 32×32 factors: a 1024 × 1024 rearrangement
    assert kron.reconstruction_error == pytest.approx(((w - kron.dense_weight().double()).norm() / w.norm()).item(),
                                                      abs=1e-5)
    low = LowRankLinear.from_original(linear, rank=40, max_flops_ratio=None)
    dense = low.up.weight.double() @ low.down.weight.double()
    assert low.reconstruction_error == pytest.approx(((w - dense).norm() / w.norm()).item(), abs=1e-5)


def test_nearest_kronecker_sum_randomized_matches_the_full_svd():
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(6, 24, 24, generator=g), torch.randn(6, 24, 24, generator=g)
    w = torch.einsum("rij,rkl->ikjl", a, b).reshape(576, 576) + 0.01 * torch.randn(576, 576, generator=g)
    a2, b2, error = nearest_kronecker_sum(w, 24, 24, 24, 24, 6)  # 576 × 576 rearranged, rank 6: randomized
    approx = torch.einsum("rij,rkl->ikjl", a2, b2).reshape(576, 576)
    assert error == pytest.approx(((w - approx).norm() / w.norm()).item(), abs=1e-5)
    assert error < 0.01 * 576 / torch.einsum("rij,rkl->ikjl", a, b).norm().item() * 1.1
