"""Shared by the benchmark scripts: fxopt's own timing (fxopt.bench), and what to record about a run."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import torch

from fxopt.bench import environment
from fxopt.timing import time_variants  # noqa: F401  (re-exported for the scripts)


def run_info() -> dict:
    """The exact command, date, commit and machine of this run."""
    root = Path(__file__).resolve().parents[1]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=root).stdout.strip()
    # code changes since the commit, not the result files a benchmark run itself rewrites
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                            ":!benchmarks/results", ":!BENCHMARKS.md"], capture_output=True, text=True,
                           cwd=root).stdout.strip()
    script = Path(sys.argv[0]).resolve()
    script = script.relative_to(root) if script.is_relative_to(root) else sys.argv[0]
    return {
        "command": " ".join(["python", str(script), *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d"),
        "commit": (commit or "unknown") + ("+changes" if dirty else ""),
        "machine": environment(torch.device("cpu")),
    }


def dense_linear(n_in: int, n_out: int, batch: int):
    """A seeded dense layer, an input batch, and the variants every layer benchmark compares
    against: {"dense": eager, "dense+compile": Inductor}. Dynamo caches compiled code per
    forward(); layers of other shapes recompile it, and past its recompile limit it silently runs
    eager, so each measurement starts from a clean cache."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    dense = torch.nn.Linear(n_in, n_out).eval()
    x = torch.randn(batch, n_in)
    return dense, x, {"dense": dense, "dense+compile": torch.compile(dense, dynamic=False)}


def copy_bandwidth(gib: float = 1.0) -> float:
    """Bytes per second of a device-to-device copy on the GPU (each byte read once and written once)."""
    from triton.testing import do_bench

    src = torch.empty(int(gib * 2**30), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src))
    return 2 * src.numel() / (ms * 1e-3)


def gpu_bandwidth(script: str) -> float:
    """Exit with a message where there is no CUDA GPU; else the measured copy bandwidth (printed)."""
    if not torch.cuda.is_available():
        sys.exit(f"{script}: needs a CUDA GPU (none found); the CPU tests cover correctness only")
    bandwidth = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: measured copy bandwidth {bandwidth / 1e9:.0f} GB/s")
    return bandwidth


def gpu_result(bandwidth: float, rows: list[dict]) -> dict:
    """What a GPU benchmark writes: the run's command, commit and machine (with the GPU's name),
    the measured bandwidth and the rows."""
    info = run_info()
    info["machine"]["gpu"] = torch.cuda.get_device_name()
    return {**info, "copy_bandwidth_gbs": round(bandwidth / 1e9, 1), "rows": rows}
