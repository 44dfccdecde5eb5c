"""Packed 1-bit and ternary linear layers against dense fp32 `F.linear` on this machine's CPU.

For each layer size and batch, side by side in one process (interleaved rounds, medians): dense
eager and dense under torch.compile; the packed layer as `fxopt optimize` saves it, with exact
activations (the default) and with `activations: int8`, each eager and compiled, binary and
ternary (each with the route its timed choice took: `bits`, the loop over the packed words,
by the AVX-512 kernel where it runs, else Inductor's for a few rows; the int8 GEMM; or the fp32
copy); and the torch reference that unpacks every weight at every call (what ran on a CPU before
the CPU path, `FXOPT_BACKEND=torch`). Ratios are dense time / packed time, best against
best (the faster of eager and compiled on each side): > 1 means faster.

    python benchmarks/binary_cpu.py --out benchmarks/results/binary_cpu.json

`benchmarks/render.py` turns the results into BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

from common import dense_linear, run_info, time_variants
from fxopt.codegen import binary_cpu, native, registry
from fxopt.save import write_json
from fxopt.substitutes.binary import BinaryLinear

SIZES = [(4096, 4096), (1024, 1024)]  # (in, out)
BATCHES = [1, 16, 256, 1024]
FORMS = {"binary": ("binary", "exact"), "binary_int8": ("binary", "int8"),
         "ternary": ("ternary", "exact"), "ternary_int8": ("ternary", "int8")}


class Reference(nn.Module):
    """The packed layer under FXOPT_BACKEND=torch: unpack at every call, one GEMM."""

    def __init__(self, packed: nn.Module):
        super().__init__()
        self.packed = packed

    def forward(self, x):
        with registry.use_backend("torch"):
            return self.packed(x)


@torch.no_grad()
def measure(n_in: int, n_out: int, batch: int, rounds: int, min_run_time: float) -> dict:
    dense, x, variants = dense_linear(n_in, n_out, batch)
    for name, (mode, activations) in FORMS.items():
        packed = BinaryLinear.from_original(dense, mode=mode, activations=activations).packed().eval()
        variants[name] = packed
        variants[f"{name}+compile"] = torch.compile(packed, dynamic=False)
        if name == "binary" and batch <= 256:
            variants["reference"] = Reference(packed)
    t = time_variants(variants, (x,), rounds, min_run_time)
    best_dense = min(t["dense"], t["dense+compile"])
    row = {"in": n_in, "out": n_out, "batch": batch, "us": {k: round(v * 1e6, 1) for k, v in t.items()},
           "routes": {name: binary_cpu.chosen_routes(variants[name].signs) for name in FORMS}}
    for name in FORMS:
        row[name] = round(best_dense / min(t[name], t[f"{name}+compile"]), 2)
    if "reference" in t:
        row["reference"] = round(best_dense / t["reference"], 2)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--min-run-time", type=float, default=0.1)
    p.add_argument("--batches", type=int, nargs="+", default=BATCHES)
    p.add_argument("--sizes", nargs="+", default=[f"{o}x{i}" for i, o in SIZES], help="OUTxIN")
    args = p.parse_args()
    info = run_info()
    rows = []
    for n_out, n_in in (map(int, size.split("x")) for size in args.sizes):
        for batch in args.batches:
            row = measure(n_in, n_out, batch, args.rounds, args.min_run_time)
            rows.append(row)
            print(f"{n_out}×{n_in} batch {batch}: " + " · ".join(
                f"{k} {row[k]:.2f}×" for k in (*FORMS, "reference") if k in row), flush=True)
    bits_kernel = "avx512-lut" if native.bits_product() is not None else "inductor"  # how the bits route ran
    write_json(args.out, info | {"forms": FORMS, "bits_kernel": bits_kernel, "rows": rows})


if __name__ == "__main__":
    main()
