"""The `torch.compile` backend against plain `torch.compile` (Inductor), on the examples.

Per example, in one process, each variant a fresh copy of the model:

* `inductor`:        torch.compile(model)
* `fxopt, no match`: torch.compile(model, backend="fxopt", options={"rules": <a rule matching nothing>})
                     — what the backend costs when it rewrites nothing (goal ≥ 0.95× of inductor);
* `fxopt, kron`:     torch.compile(model, backend="fxopt", options={"rules": "kron"}) — rewritten,
                     then Inductor.

Figures: compile time (first call, seconds) and steady-state medians (µs) over interleaved
rounds, and speed ratios against `inductor` (> 1 is faster).

    python benchmarks/backend.py --out benchmarks/results/backend_cpu.json
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import run_info, time_variants  # noqa: E402

from fxopt import rules  # noqa: E402
from fxopt.save import write_json  # noqa: E402
from fxopt.trace import load_model_file  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NOTHING = rules.parse("version: 1\nrules:\n  - match: {name: no-layer-has-this-name}\n    substitute: kron\n")


def compiled_variants(model: torch.nn.Module, inputs: tuple) -> tuple[dict, dict]:
    """The three compiled callables, and the seconds each took to compile (its first call)."""
    torch._dynamo.reset()
    variants = {
        "inductor": torch.compile(copy.deepcopy(model)),
        "fxopt, no match": torch.compile(copy.deepcopy(model), backend="fxopt", options={"rules": NOTHING}),
        "fxopt, kron": torch.compile(copy.deepcopy(model), backend="fxopt", options={"rules": "kron"}),
    }
    compile_s = {}
    with torch.no_grad():
        for name, fn in variants.items():
            start = time.perf_counter()
            fn(*inputs)
            compile_s[name] = round(time.perf_counter() - start, 2)
    return variants, compile_s


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path)
    ap.add_argument("--examples", nargs="+", default=["mlp", "transformer", "cnn"])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--min-run-time", type=float, default=0.2)
    args = ap.parse_args(argv)
    rows = []
    for name in args.examples:
        spec = load_model_file(ROOT / "examples" / f"{name}.py")
        model, inputs = spec.model.eval(), spec.example_inputs
        variants, compile_s = compiled_variants(model, inputs)
        t = time_variants(variants, inputs, args.rounds, args.min_run_time)
        row = {"example": name, "us": {k: round(v * 1e6, 1) for k, v in t.items()}, "compile_s": compile_s,
               "vs_inductor": {k: round(t["inductor"] / v, 3) for k, v in t.items() if k != "inductor"}}
        rows.append(row)
        print(f"{name:12} " + " · ".join(f"{k} {v:.0f} µs (compile {compile_s[k]:.1f} s)" for k, v in row["us"].items())
              + " · vs inductor: " + ", ".join(f"{k} {v:.3f}×" for k, v in row["vs_inductor"].items()), flush=True)
    result = {**run_info(), "rounds": args.rounds, "min_run_time": args.min_run_time, "rows": rows}
    if args.out:
        write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
