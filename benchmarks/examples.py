"""Whole models: each example before and after `rules/kron.yaml`, eager and under torch.compile.

For every example, `fxopt.bench` (the same code as `fxopt bench`) times, side by side in one
process, the original model and the rewritten one (the program `fxopt.load` returns), each eager
and under torch.compile, at the example's batch and at 8× that batch.

    python benchmarks/examples.py --out benchmarks/results/examples_cpu.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import torch

import fxopt
from common import run_info, write_result
from fxopt.bench import bench

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ["mlp", "cnn", "transformer"]


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--min-run-time", type=float, default=0.1)
    args = parser.parse_args()
    rows = []
    for name in EXAMPLES:
        ex = load_example(name)
        model = ex.build_model()
        result = fxopt.optimize(model, ex.example_inputs(), "kron", calibration=list(ex.calibration_data()))
        for scale in (1, 8):
            inputs = tuple(t.repeat(scale, *[1] * (t.dim() - 1)) for t in ex.example_inputs())
            timings = bench(model, inputs, "kron", result=result, rounds=args.rounds,
                            min_run_time=args.min_run_time, source=name)
            rows.append({"example": name, **timings})
            print(json.dumps(timings["end_to_end"]), flush=True)
    write_result(args.out, {"benchmark": "examples", **run_info(), "rules": "kron", "rows": rows})


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
