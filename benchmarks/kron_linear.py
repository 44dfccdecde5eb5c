"""KronLinear against nn.Linear on this machine's CPU, side by side in one process.

For each layer size and batch, four variants are timed in interleaved rounds (median of
`torch.utils.benchmark` medians after warm-up): dense eager, dense under torch.compile
(inductor), Kronecker eager, Kronecker under torch.compile. Ratios > 1 mean the Kronecker layer
is faster. The Kronecker layer is built exactly as `rules/kron.yaml` builds it
(compression 32, max_flops_ratio 1.0).

    python benchmarks/kron_linear.py --out benchmarks/results/kron_linear_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils import benchmark

from fxopt.flops import dense_flops
from fxopt.substitutes.kron import KronLinear

SIZES = [(512, 512), (1024, 1024), (4096, 1024), (1024, 4096)]  # (in, out)
BATCHES = [1, 64, 512]


def median_seconds(fn, x, min_run_time: float) -> float:
    timer = benchmark.Timer(stmt="fn(x)", globals={"fn": fn, "x": x}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median


def measure(n_in: int, n_out: int, batch: int, rounds: int, min_run_time: float) -> dict:
    torch.manual_seed(0)
    dense = nn.Linear(n_in, n_out).eval()
    kron = KronLinear.from_original(dense, compression=32, max_flops_ratio=1.0).eval()
    x = torch.randn(batch, n_in)
    with torch.no_grad():
        variants = {
            "dense_eager": dense,
            "dense_compiled": torch.compile(dense, dynamic=False),
            "kron_eager": kron,
            "kron_compiled": torch.compile(kron, dynamic=False),
        }
        start = time.perf_counter()
        for fn in variants.values():  # warm-up, and compilation for the compiled ones
            for _ in range(3):
                fn(x)
        warmup = time.perf_counter() - start
        times = {k: [] for k in variants}
        for _ in range(rounds):  # interleaved, so drifts hit every variant alike
            for name, fn in variants.items():
                times[name].append(median_seconds(fn, x, min_run_time))
    t = {k: statistics.median(v) for k, v in times.items()}
    shape = torch.Size([batch, n_in])
    return {
        "in": n_in, "out": n_out, "batch": batch, "rank": kron.rank, "factors": kron.factors,
        "params_ratio": round(sum(p.numel() for p in dense.parameters()) / sum(p.numel() for p in kron.parameters()), 2),
        "flops_ratio": round(dense_flops(dense, shape, None) / kron.flops(shape), 2),
        "us": {k: round(v * 1e6, 2) for k, v in t.items()},
        "speedup_vs_dense_eager": round(t["dense_eager"] / t["kron_eager"], 3),
        "speedup_vs_dense_compiled": round(t["dense_compiled"] / t["kron_eager"], 3),
        "speedup_compiled_vs_dense_compiled": round(t["dense_compiled"] / t["kron_compiled"], 3),
        "warmup_s": round(warmup, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write results as JSON here")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--min-run-time", type=float, default=0.2)
    parser.add_argument("--quick", action="store_true", help="two sizes, two batches")
    args = parser.parse_args()
    sizes, batches = (SIZES[:2], BATCHES[1:]) if args.quick else (SIZES, BATCHES)
    rows = []
    header = (f"{'in×out':>10} {'batch':>5} {'rank':>4} {'params÷':>7} {'FLOPs÷':>6} | {'dense':>9} {'dense+c':>9}"
              f" {'kron':>9} {'kron+c':>9} | {'vs dense':>8} {'vs dense+c':>10} {'c vs c':>7}")
    print(header)
    for n_in, n_out in sizes:
        for batch in batches:
            r = measure(n_in, n_out, batch, args.rounds, args.min_run_time)
            rows.append(r)
            us = r["us"]
            print(f"{n_in:>5}×{n_out:<4} {batch:>5} {r['rank']:>4} {r['params_ratio']:>7} {r['flops_ratio']:>6} |"
                  f" {us['dense_eager']:>8.1f}µ {us['dense_compiled']:>8.1f}µ {us['kron_eager']:>8.1f}µ"
                  f" {us['kron_compiled']:>8.1f}µ | {r['speedup_vs_dense_eager']:>7.2f}× "
                  f"{r['speedup_vs_dense_compiled']:>9.2f}× {r['speedup_compiled_vs_dense_compiled']:>6.2f}×", flush=True)
    result = {
        "benchmark": "kron_linear",
        "command": "python benchmarks/kron_linear.py" + (" --quick" if args.quick else ""),
        "date": time.strftime("%Y-%m-%d"),
        "machine": {"processor": platform.processor() or platform.machine(), "cores": torch.get_num_threads(),
                    "python": platform.python_version(), "torch": torch.__version__},
        "rows": rows,
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
