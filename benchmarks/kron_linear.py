"""KronLinear against nn.Linear on this machine's CPU, side by side in one process.

For each layer size and batch: dense eager, dense under torch.compile (inductor), and the
Kronecker layer in three settings (exactly what rules/kron.yaml builds: compression 32 within
half the dense FLOPs; rank 4; rank 1), each eager and compiled. Variants are timed
in interleaved rounds; each figure is the median over rounds of torch.utils.benchmark medians,
after warm-up and compilation. Ratios are dense time / Kronecker time: > 1 means faster.

    python benchmarks/kron_linear.py --out benchmarks/results/kron_linear_cpu.json

`--large` measures what a language model's layers need instead: 4096×4096 with 64×64 factors and
4096×11008 (out × in, automatic factors), ranks 1 and 4, batches 1, 16, 256 and 1024, forward
and a training step (forward + backward into every parameter and the input), each eager and
compiled:

    python benchmarks/kron_linear.py --large --out benchmarks/results/kron_linear_large_cpu.json

`benchmarks/render.py` turns the results into BENCHMARKS.md; `make bench` runs everything.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import nn

from fxopt.substitutes.kron import KronLinear

from common import dense_linear, run_info, time_variants
from fxopt.save import write_json

SIZES = [(512, 512), (1024, 1024), (4096, 1024), (1024, 4096)]  # (in, out)
BATCHES = [1, 64, 512]
SETTINGS = {"rule": dict(compression=32, max_flops_ratio=0.5), "r4": dict(rank=4), "r1": dict(rank=1)}


@torch.no_grad()
def measure(n_in: int, n_out: int, batch: int, rounds: int, min_run_time: float) -> dict:
    dense, x, variants = dense_linear(n_in, n_out, batch)
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


LARGE = [(4096, 4096, {"out": (64, 64), "in": (64, 64)}), (4096, 11008, "auto")]  # (in, out, factors)
LARGE_BATCHES = [1, 16, 256, 1024]
LARGE_RANKS = [1, 4]


def _training_step(module: nn.Module, params: list[nn.Parameter]):
    """forward + backward into `params` and the input, as one call (time_variants runs under no_grad)."""
    def step(x):
        with torch.enable_grad():
            for p in params:
                p.grad = None
            x = x.detach().requires_grad_()
            y = module(x)
            y.backward(torch.ones_like(y))
    return step


def measure_large(n_in: int, n_out: int, factors, batch: int, train: bool, rounds: int, min_run_time: float) -> dict:
    torch._dynamo.reset()
    torch.manual_seed(0)
    dense = nn.Linear(n_in, n_out)
    x = torch.randn(batch, n_in)
    layers = {"dense": dense}
    for r in LARGE_RANKS:
        layers[f"r{r}"] = KronLinear.from_original(dense, rank=r, factors=factors, max_flops_ratio=None)
    variants = {}
    for name, layer in layers.items():
        layer.train(train)
        compiled = torch.compile(layer, dynamic=False)
        if train:
            variants[name] = _training_step(layer, list(layer.parameters()))
            variants[f"{name}+compile"] = _training_step(compiled, list(layer.parameters()))
        else:
            variants[name], variants[f"{name}+compile"] = layer.eval(), compiled.eval()
    t = time_variants(variants, (x,), rounds, min_run_time)
    best_dense = min(t["dense"], t["dense+compile"])
    info = {}
    for r in LARGE_RANKS:
        name, layer = f"r{r}", layers[f"r{r}"]
        info[name] = {"rank": r, "factors": layer.factors,
                      "flops_ratio": round(2 * batch * n_in * n_out / layer.flops(x.shape), 1),
                      "speedup_best_vs_best_dense": round(best_dense / min(t[name], t[f"{name}+compile"]), 1),
                      "speedup_eager_vs_dense": round(t["dense"] / t[name], 1),
                      "speedup_compiled_vs_dense_compiled": round(t["dense+compile"] / t[f"{name}+compile"], 1)}
    return {"in": n_in, "out": n_out, "batch": batch, "mode": "train step" if train else "forward",
            "us": {k: round(v * 1e6, 1) for k, v in t.items()}, "settings": info}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write results as JSON here")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--min-run-time", type=float, default=0.1)
    parser.add_argument("--quick", action="store_true", help="two sizes, one batch (a smoke run)")
    parser.add_argument("--large", action="store_true", help="the language-model sizes, forward and training step")
    args = parser.parse_args()
    if args.large:
        cases = [(measure_large, (n_in, n_out, factors, batch, train))
                 for n_in, n_out, factors in (LARGE[:1] if args.quick else LARGE) for train in (False, True)
                 for batch in ([16] if args.quick else LARGE_BATCHES)]
        head = {"benchmark": "kron_linear_large", "ranks": LARGE_RANKS}
    else:
        sizes, batches = (SIZES[:2], [64]) if args.quick else (SIZES, BATCHES)
        cases = [(measure, (n_in, n_out, batch)) for n_in, n_out in sizes for batch in batches]
        head = {"benchmark": "kron_linear", "settings": SETTINGS}
    rows = []
    for fn, case in cases:
        row = fn(*case, args.rounds, args.min_run_time)
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {"benchmark": head["benchmark"], **run_info(), **head, "rows": rows}
    if args.out:
        write_json(args.out, result)
        print(f"wrote {args.out}")

if __name__ == "__main__":
    main()
