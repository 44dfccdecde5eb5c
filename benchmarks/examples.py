"""Whole models: each example before and after `rules/kron.yaml`, eager and under torch.compile.

For every example, side by side in one process: the original model eager, the original under
torch.compile (inductor), the rewritten model (the exported program that `fxopt.load` returns)
eager, and under torch.compile; at the example's batch and at 8× that batch. Each figure is the
median over interleaved rounds of torch.utils.benchmark medians, after warm-up and compilation.

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
from common import run_info, time_variants, write_result

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ["mlp", "cnn", "transformer"]


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@torch.no_grad()
def measure(name: str, scale: int, rounds: int, min_run_time: float) -> dict:
    torch._dynamo.reset()  # fresh Dynamo cache: no silent fallback to eager past the recompile limit
    ex = load_example(name)
    model = ex.build_model().eval()
    result = fxopt.optimize(model, ex.example_inputs(), "kron", calibration=list(ex.calibration_data()))
    rewritten = result.program.module()
    x = tuple(t.repeat(scale, *[1] * (t.dim() - 1)) for t in ex.example_inputs())
    variants = {"original": model, "original+compile": torch.compile(model, dynamic=False),
                "fxopt": rewritten, "fxopt+compile": torch.compile(rewritten, dynamic=False)}
    t = time_variants(variants, x, rounds, min_run_time)
    e2e = result.report["end_to_end"]
    return {
        "example": name, "input": [list(v.shape) for v in x],
        "us": {k: round(v * 1e6, 1) for k, v in t.items()},
        "speedup_best_vs_best": round(min(t["original"], t["original+compile"]) / min(t["fxopt"], t["fxopt+compile"]), 2),
        "speedup_eager": round(t["original"] / t["fxopt"], 2),
        "speedup_compiled": round(t["original+compile"] / t["fxopt+compile"], 2),
        "params_ratio": round(e2e["params_before"] / e2e["params_after"], 1),
        "flops_ratio": round(e2e["flops_before"] / e2e["flops_after"], 2),
        "cosine": e2e["cosine"], "top1_agreement": e2e["top1_agreement"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--min-run-time", type=float, default=0.1)
    args = parser.parse_args()
    rows = []
    for name in EXAMPLES:
        for scale in (1, 8):
            row = measure(name, scale, args.rounds, args.min_run_time)
            rows.append(row)
            print(json.dumps(row), flush=True)
    result = {"benchmark": "examples", **run_info(), "rules": "kron", "rows": rows}
    write_result(args.out, result)


if __name__ == "__main__":
    main()
