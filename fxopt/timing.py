"""Wall-clock timing shared by the gate (per-site latency in `optimize`) and `fxopt bench`.

Each figure is a median of torch.utils.benchmark's blocked runs (CUDA synchronised), taken after
warm-up calls, over interleaved rounds, so that a drift of the machine hits every variant alike.

`measure` also checks that the figures can be trusted: a variant whose slowest round took more
than `SPREAD_LIMIT` times its fastest, or a result its caller finds implausible (the gate: a
speed-up far beyond the FLOP ratio), is timed again, up to `RETRIES` times; a figure still
inconsistent after that is returned marked unreliable, with the reason, for the report to show.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any, Callable

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
    _warm_up(variants, args)
    return {k: statistics.median(v) for k, v in _rounds(variants, args, rounds, min_run_time).items()}


def _warm_up(variants: dict[str, Any], args: tuple) -> None:
    for fn in variants.values():
        for _ in range(3):
            fn(*args)


def _rounds(variants: dict[str, Any], args: tuple, rounds: int, min_run_time: float) -> dict[str, list[float]]:
    """Each variant's median seconds in each of `rounds` interleaved rounds."""
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            times[name].append(median_seconds(fn, args, min_run_time))
    return times


SPREAD_LIMIT = 1.5  # slowest round ÷ fastest round of one variant above which its median is not trusted
RETRIES = 2


@dataclass
class Timing:
    seconds: dict[str, float]  # median per variant
    spread: dict[str, float]  # slowest round ÷ fastest round, per variant
    retimed: int  # how many times it was timed again
    unreliable: str | None  # why the figures are still not to be trusted, or None


@torch.no_grad()
def measure(variants: dict[str, Any], args: tuple, rounds: int, min_run_time: float,
            implausible: Callable[[dict[str, float]], str | None] | None = None) -> Timing:
    """`time_variants` with the consistency check above (at least two rounds, to see a spread)."""
    _warm_up(variants, args)
    for attempt in range(RETRIES + 1):
        times = _rounds(variants, args, max(rounds, 2), min_run_time)
        medians = {k: statistics.median(v) for k, v in times.items()}
        spread = {k: max(v) / min(v) if min(v) > 0 else float("inf") for k, v in times.items()}
        problems = [f"{k} varied {s:.1f}× across rounds" for k, s in spread.items() if s > SPREAD_LIMIT]
        odd = implausible(medians) if implausible else None
        problems += [odd] if odd else []
        if not problems:
            return Timing(medians, spread, attempt, None)
    return Timing(medians, spread, RETRIES, "; ".join(problems) + f" (timed {RETRIES + 1} times)")
