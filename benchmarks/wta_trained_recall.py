"""How well WTA indexes of several shapes find the top class of an SGD-trained head (CPU).

`benchmarks/wta_hash.py` found that an index with 5 codes per band, which finds the top class of a
prototype head for 97% of inputs, finds it for only 58% on a head trained by dense SGD (rows at
cosine ≈ 0.67 to their inputs instead of 0.82). This trains that head once (same data, steps and
learning rate as the accuracy comparison there) and measures, for each index shape, recall@1 of
the head's argmax, the bucket rows a query reads, and the eval forward time at batch 16 against
the dense layer in the same run: the trade-off a better default has to sit on.

    python benchmarks/wta_trained_recall.py --out benchmarks/results/wta_trained_recall_cpu.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import run_info, time_variants  # noqa: E402
from wta_hash import recall, xc_example  # noqa: E402

from fxopt.save import write_json  # noqa: E402
from fxopt.substitutes.wta_hash import WTAHashedLinear  # noqa: E402

SHAPES = [(8, 480, 96), (8, 384, 96), (8, 512, 128), (8, 640, 160), (8, 288, 96), (8, 576, 192),
          (4, 576, 96)]  # (k, codes, bands)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--classes", type=int, default=100_000)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=300.0)
    p.add_argument("--zipf", type=float, default=1.0)
    p.add_argument("--candidates", type=int, default=128)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    ex = xc_example()
    torch.manual_seed(0)
    protos = ex.prototypes(args.classes, args.hidden, seed=0)
    head = nn.Linear(args.hidden, args.classes, bias=False)
    opt = torch.optim.SGD(head.parameters(), lr=args.lr)
    for s in range(args.steps):
        x, y = ex.samples(protos, args.batch, seed=10_000 + s, zipf=args.zipf)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(head(x), y).backward()
        opt.step()
    head.eval()
    x, y = ex.samples(protos, 4096, seed=99, zipf=args.zipf)
    with torch.no_grad():
        top = head(x).argmax(1)
        accuracy = (top == y).float().mean().item()
        cosine = F.cosine_similarity(head.weight[top], x).mean().item()
    rows = []
    for k, codes, bands in SHAPES:
        index = WTAHashedLinear.from_original(head, k=k, num_hashes=codes, bands=bands,
                                              candidates=args.candidates).eval()
        with torch.no_grad():
            q = index.keys(x[:256]) + torch.arange(0, bands * index.buckets, index.buckets)
            read = (index.starts[q + 1] - index.starts[q]).clamp(max=index.bucket_cap).sum(1).float().mean().item()
            t = time_variants({"dense": head, "wta": index}, (x[:16],), rounds=3, min_run_time=0.3)
        row = {"k": k, "codes": codes, "bands": bands, "codes_per_band": codes // bands,
               **recall(head, index, x), "bucket_rows_read_per_query": read,
               "batch16_dense_ms": t["dense"] * 1e3, "batch16_wta_ms": t["wta"] * 1e3,
               "batch16_speedup": t["dense"] / t["wta"]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {**run_info(), "classes": args.classes, "steps": args.steps, "lr": args.lr, "zipf": args.zipf,
              "head_accuracy": accuracy, "cosine_argmax_row_to_input": cosine, "rows": rows}
    if args.out:
        write_json(args.out, result)
    print(f"head accuracy {accuracy:.3f}, cosine of the top row to its input {cosine:.2f}")
    for r in rows:
        print(f"k {r['k']}, {r['codes']} codes / {r['bands']} bands: recall@1 {r['recall_at_1']:.3f}, "
              f"{r['bucket_rows_read_per_query']:.0f} rows read per query, batch 16 {r['batch16_speedup']:.1f}× dense")


if __name__ == "__main__":
    main()
