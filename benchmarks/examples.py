"""Whole models: each example before and after a shipped rule set, eager and under torch.compile.

For every (example, rule set) pair, `fxopt.bench` (the same code as `fxopt bench`) times, side by
side in one process, the original model and the rewritten one (the program `fxopt.load` returns),
each eager and under torch.compile, at the example's batch and at 8× that batch.

    python benchmarks/examples.py --out benchmarks/results/examples_cpu.json
    python benchmarks/examples.py --pairs mlp:lowrank transformer:lowrank cnn:separable cnn:bottleneck \
        --layerwise-steps 100 --out benchmarks/results/examples_efficient_cpu.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import fxopt
from common import run_info
from fxopt.bench import bench
from fxopt.layerwise import Layerwise
from fxopt.save import write_json
from fxopt.trace import calibration_batches, load_model_file

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ["mlp", "cnn", "transformer"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--min-run-time", type=float, default=0.1)
    parser.add_argument("--pairs", nargs="+", default=[f"{e}:kron" for e in EXAMPLES],
                        help="example:rules pairs (shipped rule set names)")
    parser.add_argument("--layerwise-steps", type=int, default=0, help="layer-wise training before timing")
    args = parser.parse_args()
    rows = []
    for pair in args.pairs:
        name, rules = pair.split(":")
        spec = load_model_file(ROOT / "examples" / f"{name}.py")
        model = spec.model
        result = fxopt.optimize(model, spec.example_inputs, rules, calibration=calibration_batches(spec),
                                layerwise=Layerwise(steps=args.layerwise_steps, lr=3e-3))
        for scale in (1, 8):
            inputs = tuple(t.repeat(scale, *[1] * (t.dim() - 1)) for t in spec.example_inputs)
            timings = bench(model, inputs, rules, result=result, rounds=args.rounds,
                            min_run_time=args.min_run_time, source=name)
            applied = [s["key"] for s in result.report["sites"] if s["status"] == "applied"]
            rows.append({"example": name, "applied": applied, "sites_claimed": sum(
                bool(s["rule"]) for s in result.report["sites"]), **timings})
            print(pair, json.dumps(timings["end_to_end"]), flush=True)
    if args.out:
        write_json(args.out, {"benchmark": "examples", **run_info(), "rules": sorted({p.split(":")[1] for p in args.pairs}),
                              "layerwise_steps": args.layerwise_steps, "rows": rows})
        print(f"wrote {args.out}")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
