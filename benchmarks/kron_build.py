"""How long the `build` stage takes: every SVD-based `from_original` on large layers, on this CPU.

AlexNet's architecture (five convolutions, then 9216 → 4096 → 4096 → 1000 linears; random weights,
built here so that nothing is downloaded) through `fxopt.optimize` with the shipped `kron` rules,
the `build` stage's seconds read from the report; and single layers of a Llama-style MLP
(4096 × 11008 and back) built by `kron` and `lowrank` at their shipped defaults. The nearest
Kronecker sum and the truncated SVD keep only the terms they need (fxopt.linalg.top_singular).

    python benchmarks/kron_build.py --out benchmarks/results/kron_build_cpu.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch import nn

import fxopt
from fxopt.save import write_json
from fxopt.substitutes import get

from common import run_info


def alexnet(classes: int = 1000) -> nn.Module:
    """torchvision's AlexNet layer for layer (features, 6×6 average pool, classifier), eval mode."""
    return nn.Sequential(
        nn.Conv2d(3, 64, 11, stride=4, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
        nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
        nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(), nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(),
        nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2), nn.AdaptiveAvgPool2d(6), nn.Flatten(),
        nn.Linear(9216, 4096), nn.ReLU(), nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, classes),
    ).eval()


def build_stage(model: nn.Module, x: torch.Tensor) -> dict:
    result = fxopt.optimize(model, (x,), "kron", time_sites=False)
    stages = {s["name"]: round(s["seconds"], 2) for s in result.report["stages"]}
    sites = [{"site": s["key"], "status": s["status"], "build_seconds": s["build_seconds"],
              "reconstruction_error": s["reconstruction_error"]} for s in result.report["sites"]]
    return {"stages": stages, "sites": sites}


def layer(technique: str, n_in: int, n_out: int) -> dict:
    torch.manual_seed(0)
    linear = nn.Linear(n_in, n_out)
    spec = get(technique)
    start = time.perf_counter()
    sub = spec.build(linear, spec.parse_params({}))
    return {"technique": technique, "in": n_in, "out": n_out, "seconds": round(time.perf_counter() - start, 2),
            "rank": sub.rank, "reconstruction_error": round(sub.reconstruction_error, 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.manual_seed(0)
    result = {"benchmark": "kron_build", **run_info(),
              "alexnet": build_stage(alexnet(), torch.randn(2, 3, 224, 224)),
              "layers": [layer(t, n_in, n_out) for t in ("kron", "lowrank")
                         for n_in, n_out in ((4096, 11008), (11008, 4096))]}
    print(json.dumps(result, indent=1))
    if args.out:
        write_json(args.out, result)


if __name__ == "__main__":
    main()
