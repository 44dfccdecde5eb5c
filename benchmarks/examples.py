"""Whole models: each example before and after `rules/kron.yaml`, eager and under torch.compile.

For every example, `fxopt.bench` (the same code as `fxopt bench`) times, side by side in one
process, the original model and the rewritten one (the program `fxopt.load` returns), each eager
and under torch.compile, at the example's batch and at 8× that batch.

    python benchmarks/examples.py --out benchmarks/results/examples_cpu.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import fxopt
from common import run_info
from fxopt.bench import bench
from fxopt.save import write_json
from fxopt.trace import calibration_batches, load_model_file

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ["mlp", "cnn", "transformer"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--min-run-time", type=float, default=0.1)
    args = parser.parse_args()
    rows = []
    for name in EXAMPLES:
        spec = load_model_file(ROOT / "examples" / f"{name}.py")
        model = spec.model
        result = fxopt.optimize(model, spec.example_inputs, "kron", calibration=calibration_batches(spec))
        for scale in (1, 8):
            inputs = tuple(t.repeat(scale, *[1] * (t.dim() - 1)) for t in spec.example_inputs)
            timings = bench(model, inputs, "kron", result=result, rounds=args.rounds,
                            min_run_time=args.min_run_time, source=name)
            rows.append({"example": name, **timings})
            print(json.dumps(timings["end_to_end"]), flush=True)
    if args.out:
        write_json(args.out, {"benchmark": "examples", **run_info(), "rules": "kron", "rows": rows})
        print(f"wrote {args.out}")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
