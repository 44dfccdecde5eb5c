"""Wall-clock timing shared by the gate (per-site latency in `optimize`) and `fxopt bench`.

Each figure is a median of torch.utils.benchmark's blocked runs (CUDA synchronised), taken after
warm-up calls, over interleaved rounds, so that a drift of the machine hits every variant alike.
"""

from __future__ import annotations

import statistics
from typing import Any

import torch
from torch.utils import benchmark


def median_seconds(fn, args: tuple, min_run_time: float) -> float:
    """Median of torch.utils.benchmark's blocked runs of fn(*args) (CUDA is synchronised)."""
    timer = benchmark.Timer(stmt="fn(*args)", globals={"fn": fn, "args": args}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median


@torch.no_grad()
def time_variants(variants: dict[str, Any], args: tuple, rounds: int, min_run_time: float) -> dict[str, float]:
    """Median seconds per variant: three warm-up calls each, then interleaved rounds, so that a
    drift of the machine hits every variant alike."""
    for fn in variants.values():
        for _ in range(3):
            fn(*args)
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            times[name].append(median_seconds(fn, args, min_run_time))
    return {k: statistics.median(v) for k, v in times.items()}
