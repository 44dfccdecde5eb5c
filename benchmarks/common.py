"""Shared by the benchmark scripts: timing, and what to record about the run."""

from __future__ import annotations

import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.utils import benchmark


def median_seconds(fn, x, min_run_time: float) -> float:
    """Median of torch.utils.benchmark's blocked runs of fn(*x) (x a tuple) or fn(x)."""
    args = x if isinstance(x, tuple) else (x,)
    timer = benchmark.Timer(stmt="fn(*args)", globals={"fn": fn, "args": args}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median


def time_variants(variants: dict, x, rounds: int, min_run_time: float) -> dict[str, float]:
    """Median seconds of each variant on x: three warm-up calls each (compilation happens there),
    then interleaved rounds, so that a drift of the machine hits every variant alike."""
    for fn in variants.values():
        for _ in range(3):
            fn(*x) if isinstance(x, tuple) else fn(x)
    times = {k: [] for k in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            times[name].append(median_seconds(fn, x, min_run_time))
    return {k: statistics.median(v) for k, v in times.items()}


def write_result(path: Path | None, result: dict) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {path}")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_info() -> dict:
    """The exact command, date, commit and machine of this run."""
    root = Path(__file__).resolve().parents[1]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=root).stdout.strip()
    # code changes since the commit, not the result files a benchmark run itself rewrites
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                            ":!benchmarks/results", ":!BENCHMARKS.md"], capture_output=True, text=True,
                           cwd=root).stdout.strip()
    script = Path(sys.argv[0]).resolve().relative_to(root) if Path(sys.argv[0]).resolve().is_relative_to(root) else sys.argv[0]
    return {
        "command": " ".join(["python", str(script), *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d"),
        "commit": (commit or "unknown") + ("+changes" if dirty else ""),
        "machine": {"cpu": cpu_model(), "threads": torch.get_num_threads(), "python": platform.python_version(),
                    "torch": torch.__version__},
    }
