"""KronLinear against nn.Linear on this machine's CPU, side by side in one process.

For each layer size and batch: dense eager, dense under torch.compile (inductor), and the
Kronecker layer in three settings (exactly what rules/kron.yaml builds: compression 32 within
half the dense FLOPs; rank 4; rank 1), each eager and compiled. Variants are timed
in interleaved rounds; each figure is the median over rounds of torch.utils.benchmark medians,
after warm-up and compilation. Ratios are dense time / Kronecker time: > 1 means faster.

    python benchmarks/kron_linear.py --out benchmarks/results/kron_linear_cpu.json

`benchmarks/render.py` turns the results into BENCHMARKS.md; `make bench` runs everything.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import nn

from fxopt.substitutes.kron import KronLinear

from common import run_info, time_variants
from fxopt.save import write_json

SIZES = [(512, 512), (1024, 1024), (4096, 1024), (1024, 4096)]  # (in, out)
BATCHES = [1, 64, 512]
SETTINGS = {"rule": dict(compression=32, max_flops_ratio=0.5), "r4": dict(rank=4), "r1": dict(rank=1)}


@torch.no_grad()
def measure(n_in: int, n_out: int, batch: int, rounds: int, min_run_time: float) -> dict:
    # Dynamo caches compiled code per forward(); layers of other shapes recompile it, and past
    # its recompile limit it silently runs eager. Each measurement starts from a clean cache.
    torch._dynamo.reset()
    torch.manual_seed(0)
    dense = nn.Linear(n_in, n_out).eval()
    x = torch.randn(batch, n_in)
    variants = {"dense": dense, "dense+compile": torch.compile(dense, dynamic=False)}
    info = {}
    for name, kwargs in SETTINGS.items():
        kron = KronLinear.from_original(dense, **kwargs).eval()
        variants[name] = kron
        variants[f"{name}+compile"] = torch.compile(kron, dynamic=False)
        info[name] = {"rank": kron.rank, "factors": kron.factors,
                      "params_ratio": round(dense.weight.numel() / (kron.A.numel() + kron.B.numel()), 1),
                      "flops_ratio": round(2 * batch * n_in * n_out / kron.flops(x.shape), 2)}
    t = time_variants(variants, (x,), rounds, min_run_time)
    best_dense = min(t["dense"], t["dense+compile"])
    for name in SETTINGS:
        info[name]["speedup_best_vs_best_dense"] = round(best_dense / min(t[name], t[f"{name}+compile"]), 2)
        info[name]["speedup_eager_vs_dense"] = round(t["dense"] / t[name], 2)
        info[name]["speedup_eager_vs_dense_compiled"] = round(t["dense+compile"] / t[name], 2)
        info[name]["speedup_compiled_vs_dense_compiled"] = round(t["dense+compile"] / t[f"{name}+compile"], 2)
    return {"in": n_in, "out": n_out, "batch": batch, "us": {k: round(v * 1e6, 1) for k, v in t.items()},
            "settings": info}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write results as JSON here")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--min-run-time", type=float, default=0.1)
    parser.add_argument("--quick", action="store_true", help="two sizes, one batch (a smoke run)")
    args = parser.parse_args()
    sizes, batches = (SIZES[:2], [64]) if args.quick else (SIZES, BATCHES)
    rows = []
    for n_in, n_out in sizes:
        for batch in batches:
            row = measure(n_in, n_out, batch, args.rounds, args.min_run_time)
            rows.append(row)
            print(json.dumps(row), flush=True)
    result = {"benchmark": "kron_linear", **run_info(), "settings": SETTINGS, "rows": rows}
    if args.out:
        write_json(args.out, result)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
