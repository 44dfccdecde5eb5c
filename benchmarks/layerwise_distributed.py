"""Layer-wise training and distillation across processes: `fxopt optimize --nproc 2` (two
processes of one thread each, under torchrun) against one process of two threads, on this machine.

For each model, the two configurations run alternately `--reps` times (`--rules bottleneck
--layerwise-steps 200 --distill-steps 100 --no-time-sites`); the figures are the median wall times
of the `layerwise` stage as process 0's report.json records it (recording the sites' values,
measuring step costs, training, and gathering the trained substitutes included), of the `distill`
stage (data parallel: each batch's rows split across the processes), and of the whole command.

    python benchmarks/layerwise_distributed.py --out benchmarks/results/layerwise_distributed_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import run_info
from fxopt.save import write_json

ROOT = Path(__file__).resolve().parents[1]
MODELS = ["examples/cnn.py", "benchmarks/models/cnn9.py"]
# --nproc runs each process with one thread itself, and process 0 takes back the launcher's (two)
# while it works alone (fxopt.distributed.alone): the launcher keeps the machine's default
CONFIGS = {"1 process × 2 threads": ([], "2"), "2 processes × 1 thread": (["--nproc", "2"], None)}


def _env(threads: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    return env if threads is None else env | {"OMP_NUM_THREADS": threads}


def run(model: str, extra: list[str], threads: str, steps: int, distill: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "fxopt", "optimize", str(ROOT / model), "--rules", "bottleneck",
                        "--layerwise-steps", str(steps), "--distill-steps", str(distill), "--no-time-sites",
                        "--out", str(out), *extra],
                       check=True, capture_output=True, env=_env(threads), cwd=ROOT)
        wall = time.perf_counter() - start
        report = json.loads((out / "report.json").read_text())
    stages = {s["name"]: s["seconds"] for s in report["stages"]}
    return {"layerwise_s": stages["layerwise"], "distill_s": stages.get("distill"), "command_s": round(wall, 2),
            "sites_trained": sum(1 for s in report["sites"] if s.get("layerwise"))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--distill-steps", type=int, default=100)
    p.add_argument("--models", nargs="+", default=MODELS)
    args = p.parse_args()
    info = run_info()
    rows = []
    for model in args.models:
        runs: dict[str, list[dict]] = {name: [] for name in CONFIGS}
        for _ in range(args.reps):
            for name, (extra, threads) in CONFIGS.items():
                runs[name].append(run(model, extra, threads, args.steps, args.distill_steps))
        median = {name: {k: statistics.median(r[k] for r in rs) for k in ("layerwise_s", "distill_s", "command_s")}
                  for name, rs in runs.items()}
        one, two = (median[name] for name in CONFIGS)
        rows.append({"model": model, "sites_trained": runs[next(iter(CONFIGS))][0]["sites_trained"],
                     "median": median, "runs": runs,
                     "layerwise_ratio": round(two["layerwise_s"] / one["layerwise_s"], 3),
                     "distill_ratio": round(two["distill_s"] / one["distill_s"], 3),
                     "command_ratio": round(two["command_s"] / one["command_s"], 3)})
        print(f"{model}: layer-wise stage {one['layerwise_s']:.2f} s → {two['layerwise_s']:.2f} s "
              f"({rows[-1]['layerwise_ratio']}×), distillation {one['distill_s']:.2f} s → {two['distill_s']:.2f} s "
              f"({rows[-1]['distill_ratio']}×), whole command {rows[-1]['command_ratio']}×", flush=True)
    write_json(args.out, info | {"steps": args.steps, "distill_steps": args.distill_steps, "rules": "bottleneck",
                                 "configs": list(CONFIGS), "rows": rows})


if __name__ == "__main__":
    main()
