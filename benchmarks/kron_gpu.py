"""The fused Kronecker kernel on a GPU: `fxopt::kron_linear` against the unfused torch composition
(two GEMMs, eager and under torch.compile) and against the dense layer in bf16 (cuBLAS, eager and
under torch.compile).

    python benchmarks/kron_gpu.py --out benchmarks/results/kron_gpu_h100.json

Each case is a 4096 × 4096 layer as R Kronecker terms of 64 × 64 factors (A_r, B_r: 64 × 64), in
bf16, at batch 256 and 8192, twice: the layer alone (bias only), and the layer with the epilogue
the fuse pass makes of `gelu(layer(x)) + residual` (the unfused variants run those as separate
torch ops; torch.compile fuses them into its own kernels). Times are medians of
`triton.testing.do_bench` (CUDA events, L2 flushed), after a correctness check of the kernel
against the fp32 torch reference. The fused kernel reads x and writes y once, so the script also
prints the fraction of the copy bandwidth measured in the same run that it reaches.

Goal (issue 6): ≥ 4× over dense bf16 cuBLAS at batch 8192. Needs a CUDA GPU; exits with a message
otherwise.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import gpu_bandwidth, gpu_result  # noqa: E402

from fxopt.codegen import epilogue as ep  # noqa: E402
from fxopt.codegen.kron import kron_linear, kron_linear_reference  # noqa: E402
from fxopt.codegen.registry import use_backend  # noqa: E402
from fxopt.save import write_json  # noqa: E402

CHAINS = {"bias": (), "gelu+residual": (("gelu",), ("add", 0))}


def case(rank: int, factor: int, batch: int, chain: str, bandwidth: float) -> dict:
    from triton.testing import do_bench

    g = torch.Generator(device="cuda").manual_seed(0)
    a = (torch.randn(rank, factor, factor, device="cuda", generator=g) / factor ** 0.5).bfloat16()
    b = (torch.randn(rank, factor, factor, device="cuda", generator=g) / factor ** 0.5).bfloat16()
    n = factor * factor
    bias = torch.randn(n, device="cuda", generator=g).bfloat16()
    x = torch.randn(batch, n, device="cuda", generator=g).bfloat16()
    steps = CHAINS[chain]
    extras = [torch.randn(batch, n, device="cuda", generator=g).bfloat16()] if steps else []
    text = ep.encode(steps)
    dense = sum(torch.kron(a[r].float(), b[r].float()) for r in range(rank)).bfloat16()

    with use_backend("triton"):
        out = kron_linear(x, a, b, bias, extras, text)
    ref = kron_linear_reference(x.float(), a.float(), b.float(), bias.float(), [e.float() for e in extras], steps)
    err = ((out.float() - ref).norm() / ref.norm()).item()

    def unfused(x):
        return kron_linear_reference(x, a, b, bias, extras, steps)

    def dense_layer(x):
        return ep.apply(F.linear(x, dense, bias), steps, extras)

    unfused_c, dense_c = torch.compile(unfused), torch.compile(dense_layer)
    unfused_c(x), dense_c(x)  # compile outside the timing
    with use_backend("triton"):
        ms_fused = do_bench(lambda: kron_linear(x, a, b, bias, extras, text))
    ms = {"fused_kernel": ms_fused, "unfused_torch": do_bench(lambda: unfused(x)),
          "unfused_compiled": do_bench(lambda: unfused_c(x)), "dense_bf16": do_bench(lambda: dense_layer(x)),
          "dense_bf16_compiled": do_bench(lambda: dense_c(x))}
    moved = 2 * (x.numel() + batch * n + sum(e.numel() for e in extras) + a.numel() + b.numel())
    return {
        "rank": rank, "factor": factor, "batch": batch, "epilogue": chain, "rel_error_vs_reference": err,
        "ms": ms, **{f"speedup_vs_{k}": round(v / ms_fused, 3) for k, v in ms.items() if k != "fused_kernel"},
        "bandwidth_fraction": round(moved / (ms_fused * 1e-3) / bandwidth, 3),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path)
    ap.add_argument("--factor", type=int, default=64, help="A_r and B_r are factor × factor")
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--batches", type=int, nargs="+", default=[256, 8192])
    args = ap.parse_args(argv)
    bandwidth = gpu_bandwidth("kron_gpu.py")
    rows = []
    for rank in args.ranks:
        for batch in args.batches:
            for chain in CHAINS:
                r = case(rank, args.factor, batch, chain, bandwidth)
                rows.append(r)
                print(f"rank {rank} batch {batch:>5} {chain:>13}: fused {r['ms']['fused_kernel'] * 1e3:8.1f} µs · "
                      f"×{r['speedup_vs_dense_bf16']:.2f} vs bf16 cuBLAS · ×{r['speedup_vs_dense_bf16_compiled']:.2f} "
                      f"vs dense compiled · ×{r['speedup_vs_unfused_compiled']:.2f} vs unfused compiled · "
                      f"{r['bandwidth_fraction'] * 100:.0f}% of bandwidth · rel err {r['rel_error_vs_reference']:.1e}",
                      flush=True)
    if args.out:
        write_json(args.out, gpu_result(bandwidth, rows))


if __name__ == "__main__":
    main()
