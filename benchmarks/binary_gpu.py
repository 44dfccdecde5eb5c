"""The 1-bit kernel on a GPU: `fxopt::binary_linear` against bf16 `F.linear` (cuBLAS) and against
`torch.compile` of the same, with the fraction of the measured memory bandwidth it reaches.

    python benchmarks/binary_gpu.py --out benchmarks/results/binary_gpu_h100.json

For each (out × in, batch): median milliseconds from `triton.testing.do_bench` (CUDA events, L2
flushed before each run), speed-ups dense ÷ binary, and for the binary kernel its achieved
bandwidth (packed weights + activations in and out, over its time) against the copy bandwidth
measured in the same run (a 1 GiB device-to-device copy, read + write). Correctness is checked
against the torch reference before timing. Needs a CUDA GPU; exits with a message otherwise.

Goals (issue 3): batch 1 at 8192×8192 and up ≥ 6× faster than bf16 cuBLAS and ≥ 60% of measured
bandwidth; batch ≥ 512 no slower than 0.9× of bf16 cuBLAS.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import gpu_bandwidth, gpu_result  # noqa: E402

from fxopt.bits import pack_signs  # noqa: E402
from fxopt.codegen.binary import binary_linear, binary_linear_reference  # noqa: E402
from fxopt.codegen.registry import use_backend  # noqa: E402
from fxopt.save import write_json  # noqa: E402


def case(n: int, k: int, batch: int, bandwidth: float) -> dict:
    from triton.testing import do_bench

    g = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(n, k, device="cuda", generator=g)
    signs, scale = pack_signs(w), w.abs().mean(1)
    bias = torch.randn(n, device="cuda", generator=g)
    dense = (torch.sign(w) * scale[:, None]).bfloat16()
    bias16 = bias.bfloat16()
    x = torch.randn(batch, k, device="cuda", generator=g).bfloat16()

    with use_backend("triton"):
        out = binary_linear(x, signs, scale, bias, None, k, [], "", "exact")
    ref = binary_linear_reference(x.float(), signs, scale, bias, None, k, [], ())
    err = ((out.float() - ref).norm() / ref.norm()).item()

    compiled = torch.compile(lambda a: F.linear(a, dense, bias16))
    compiled(x)  # compile outside the timing
    with use_backend("triton"):
        ms_binary = do_bench(lambda: binary_linear(x, signs, scale, bias, None, k, [], "", "exact"))
    ms_dense = do_bench(lambda: F.linear(x, dense, bias16))
    ms_compiled = do_bench(lambda: compiled(x))
    moved = signs.numel() * 4 + scale.numel() * 4 + bias.numel() * 4 + x.numel() * 2 + batch * n * 2
    return {
        "out": n, "in": k, "batch": batch, "rel_error_vs_reference": err,
        "ms": {"binary": ms_binary, "dense_bf16": ms_dense, "dense_bf16_compiled": ms_compiled},
        "speedup_vs_dense": round(ms_dense / ms_binary, 3),
        "speedup_vs_compiled": round(ms_compiled / ms_binary, 3),
        "bandwidth_fraction": round(moved / (ms_binary * 1e-3) / bandwidth, 3),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path)
    ap.add_argument("--shapes", nargs="+", default=["8192x8192", "16384x16384", "28672x8192"],
                    help="OUTxIN weight shapes")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 16, 512, 2048])
    args = ap.parse_args(argv)
    bandwidth = gpu_bandwidth("binary_gpu.py")
    rows = []
    for shape in args.shapes:
        n, k = (int(v) for v in shape.lower().split("x"))
        for batch in args.batches:
            r = case(n, k, batch, bandwidth)
            rows.append(r)
            print(f"{n:>6}×{k:<6} batch {batch:>5}: binary {r['ms']['binary'] * 1e3:8.1f} µs · "
                  f"×{r['speedup_vs_dense']:.2f} vs bf16 cuBLAS · ×{r['speedup_vs_compiled']:.2f} vs compiled · "
                  f"{r['bandwidth_fraction'] * 100:.0f}% of bandwidth · rel err {r['rel_error_vs_reference']:.1e}",
                  flush=True)
    if args.out:
        write_json(args.out, gpu_result(bandwidth, rows))


if __name__ == "__main__":
    main()
