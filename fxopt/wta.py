"""Winner-Takes-All hashing and LSH band tables: which output rows can win for an input.

WTA hash (Yagnik et al., ICCV 2011; used for output layers by Bakhtiary, Lapedriza & Masip,
arXiv 1504.07488). Cut random permutations of the `dim` coordinates into windows of K; the code of
a vector for one window is the position of its largest coordinate inside the window, in [0, K).
A code depends only on the order of the coordinates, so vectors whose coordinates rank alike
(an input and the weight row it scores highest against) share codes more often than unrelated
ones do (1/K for independent vectors).

Banding: L codes are grouped into `bands` bands of b = L / bands codes; a band's key is its b
codes read as a base-K number, so each band has K^b buckets. A row is a candidate for an input
when they land in the same bucket of at least one band; candidates are ranked by the number of
bands they share (collision count), best first, up to a budget.

Finding the candidates is the job of `fxopt::wta_select` (fxopt.codegen.wta_hash): on a CPU it
reads per-band tables of the rows sorted by bucket, so a query touches about bands · C / K^b rows
instead of C; on a GPU it counts the collisions of all rows densely and takes the top ones.

    >>> h = WTAHash(dim=512, k=8, num_hashes=128, bands=32, seed=0)
    >>> row_keys = h(weight)                                     # (C, 32) bucket keys  # doctest: +SKIP
"""

from __future__ import annotations

import torch

from fxopt.codegen.wta_hash import wta_codes

MAX_BUCKETS = 1 << 22  # K^b per band: the CPU tables hold bands · K^b + 1 offsets


def band_shape(k: int, num_hashes: int, bands: int) -> tuple[int, int]:
    """(codes per band, buckets per band) of L = `num_hashes` codes in `bands` bands, or ValueError."""
    if num_hashes < 1 or bands < 1 or num_hashes % bands:
        raise ValueError(f"num_hashes={num_hashes} must be a positive multiple of bands={bands}")
    size = num_hashes // bands
    if k ** size > MAX_BUCKETS:
        raise ValueError(f"k^(num_hashes/bands) = {k}^{size} buckets per band is over {MAX_BUCKETS}; "
                         "use more bands or a smaller k")
    return size, k ** size


class WTAHash:
    """L = `num_hashes` WTA codes in `bands` bands; the same `seed` gives the same windows."""

    def __init__(self, dim: int, k: int, num_hashes: int, bands: int, seed: int = 0):
        if not 2 <= k <= dim:
            raise ValueError(f"WTA window k={k} must lie in [2, dim={dim}]")
        self.dim, self.k, self.num_hashes, self.bands, self.seed = dim, k, num_hashes, bands, seed
        self.band_size, self.buckets = band_shape(k, num_hashes, bands)
        self.windows = self._windows()
        self.powers = k ** torch.arange(self.band_size)  # band key = Σ_i code_i · k^i

    def _windows(self) -> torch.Tensor:
        """(L, K) coordinate indices: consecutive K-windows of fresh permutations (a window never
        spans two permutations, so its K coordinates are distinct)."""
        gen = torch.Generator().manual_seed(self.seed)
        per = self.dim // self.k
        perms = -(-self.num_hashes // per)
        cut = [torch.randperm(self.dim, generator=gen)[: per * self.k].view(per, self.k) for _ in range(perms)]
        return torch.cat(cut)[: self.num_hashes].contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(N, bands) int64 bucket keys of the rows of x (N, dim)."""
        return hash_rows(x, self.windows.to(x.device), self.powers.to(x.device))


def band_keys(codes: torch.Tensor, powers: torch.Tensor) -> torch.Tensor:
    """(N, bands) int64 keys from (N, L) codes: each band's b = len(powers) codes as a base-K number."""
    n, b = codes.shape[0], powers.shape[0]
    return (codes.view(n, -1, b) * powers).sum(-1)


def hash_rows(x: torch.Tensor, windows: torch.Tensor, powers: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """(N, bands) int64 bucket keys of the rows of x (N, dim), `chunk` rows at a time, so that
    hashing a whole weight matrix never holds its (C, L) int64 codes at once."""
    if x.shape[0] <= chunk:
        return band_keys(wta_codes(x, windows), powers)
    return torch.cat([band_keys(wta_codes(x[i:i + chunk], windows), powers) for i in range(0, x.shape[0], chunk)])
