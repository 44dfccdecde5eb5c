"""WTA-hashed output layer against the dense layer, in the same run (Bakhtiary et al., arXiv 1504.07488).

Extreme-classification shape: hidden 512, 100k and 500k classes. Data: the class-prototype
generator of `examples/xc.py` (unit rows in families of 100 that share a direction; an input is
its class's prototype plus noise, cosine ≈ 0.8 to it). For each class count:

* inference (eval, no grad) at batch 1 and 16: the dense `nn.Linear` (eager and `torch.compile`)
  against the hashed layer's forward, which returns the full (N, C) output (candidates exact,
  −inf elsewhere);
* recall@1 / recall@5: share of 2,048 fresh inputs whose dense top-1 (top-5) class is in the
  candidate set, for the layer built from the prototype head (rows aligned with their inputs);
* the full training step at batch 128: dense = forward, cross-entropy, backward, SGD step;
  hashed = hashing, lookup, sampled softmax over candidates ∪ labels, sparse backward, SGD step
  on sparse rows, updating the class means of an `--index inputs` layer, and the table rebuilds
  every `rebuild_every` steps, on fresh batches and timed over whole rebuild periods so their
  cost is counted (mean per step, both ways);
* (100k only, `--train-classes`) accuracy after training both ways from the same initialisation,
  on the same long-tailed batches, for the same number of steps: the hashed layer once with each
  kind of index (`inputs`: the tables hash each class's mean input; `weights`: its weight row),
  scored through its index and densely; and the recall of a weight index over the head that
  dense training produced (an SGD-trained head, not a prototype one).

    python benchmarks/wta_hash.py --out benchmarks/results/wta_hash_cpu.json
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import run_info, time_variants  # noqa: E402

from fxopt.save import write_json  # noqa: E402
from fxopt.trace import import_model_file  # noqa: E402
from fxopt.substitutes.wta_hash import WTAHashedLinear, sampled_softmax_loss  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def xc_example():
    """examples/xc.py as a module: its prototype and sample generators."""
    return import_model_file(ROOT / "examples" / "xc.py")


def _hash_params(args) -> dict:
    return {"k": args.k, "num_hashes": args.num_hashes, "bands": args.bands, "candidates": args.candidates,
            "rebuild_every": args.rebuild_every, "index": args.index}


def inference(dense: nn.Linear, hashed: WTAHashedLinear, x: torch.Tensor, batches, rounds: int) -> dict:
    compiled = torch.compile(dense)
    out = {}
    for b in batches:
        xb = x[:b]
        t = time_variants({"dense": dense, "compiled": compiled, "wta": hashed}, (xb,), rounds=rounds, min_run_time=0.3)
        out[f"batch_{b}"] = {"dense_ms": t["dense"] * 1e3, "compiled_ms": t["compiled"] * 1e3, "wta_ms": t["wta"] * 1e3,
                             "speedup_vs_dense": t["dense"] / t["wta"], "speedup_vs_compiled": t["compiled"] / t["wta"]}
    return out


@torch.no_grad()
def recall(dense: Callable[[torch.Tensor], torch.Tensor], hashed: WTAHashedLinear, x: torch.Tensor) -> dict:
    top = dense(x).topk(5, dim=1).indices
    rows, valid = hashed.select(x)
    hit = (rows[:, None, :] == top[:, :, None]) & valid[:, None, :]
    found = hit.any(-1)
    return {"recall_at_1": found[:, 0].float().mean().item(), "recall_at_5": found.float().mean().item(),
            "inputs": x.shape[0]}


class Trainers:
    """The dense layer and the hashed layer from the same initialisation, each with its SGD step
    (dense: full cross-entropy; hashed: sampled softmax, sparse rows)."""

    def __init__(self, init: nn.Linear, params: dict, lr: float):
        self.dense = copy.deepcopy(init)
        self.hashed = WTAHashedLinear.from_original(init, **params).train()
        self._opt_d = torch.optim.SGD(self.dense.parameters(), lr=lr)
        self._opt_h = torch.optim.SGD(self.hashed.parameters(), lr=lr)

    def dense_step(self, x, y):
        self._opt_d.zero_grad(set_to_none=True)
        F.cross_entropy(self.dense(x), y).backward()
        self._opt_d.step()

    def hashed_step(self, x, y):
        self._opt_h.zero_grad(set_to_none=True)
        sampled_softmax_loss(self.hashed, x, y).backward()
        self._opt_h.step()


def step_times(init: nn.Linear, params: dict, data, dense_steps: int, lr: float) -> dict:
    """Mean milliseconds per training step, dense and hashed, on fresh batches (as a real run sees
    them, so the rows to rehash at each rebuild are as many as training really touches). The hashed
    layer first trains one rebuild period untimed, so the timed window opens with the rebuild of the
    rows that period touched and holds one rebuild per period: their cost is in the mean."""
    t = Trainers(init, params, lr)
    every = params["rebuild_every"]
    warm, timed = data[:every], data[every:]
    for x, y in warm[:2]:
        t.dense_step(x, y)
    start = time.perf_counter()
    for x, y in timed[:dense_steps]:
        t.dense_step(x, y)
    dense_ms = (time.perf_counter() - start) / dense_steps * 1e3
    for x, y in warm:
        t.hashed_step(x, y)
    before = t.hashed.rebuilds
    start = time.perf_counter()
    for x, y in timed:
        t.hashed_step(x, y)
    wta_ms = (time.perf_counter() - start) / len(timed) * 1e3
    return {"dense_step_ms": dense_ms, "dense_steps_timed": dense_steps, "wta_step_ms": wta_ms,
            "wta_steps_timed": len(timed), "wta_rebuilds_in_window": t.hashed.rebuilds - before,
            "speedup": dense_ms / wta_ms}


def train_accuracy(classes: int, params: dict, ex, protos, args) -> dict:
    """Both ways from the same initialisation (no bias, as wide heads usually have none), on the same
    long-tailed batches (Zipf labels), for the same number of steps; scored on fresh samples of
    the same distribution. The hashed layer is trained twice, once with each kind of index (what
    its tables hash per class: the weight row, or the mean of the class's inputs), and scored
    through its index and with its weights computed densely. Also: the recall of a weight index
    over the *dense-trained* head."""
    init = nn.Linear(args.hidden, classes, bias=False)
    other = "weights" if params["index"] == "inputs" else "inputs"
    t = Trainers(init, params, args.train_lr)
    t2 = Trainers(init, {**params, "index": other}, args.train_lr)
    seconds = {"dense": 0.0, "wta": 0.0, "wta_other": 0.0}
    for s in range(args.train_steps):
        x, y = ex.samples(protos, args.batch, seed=10_000 + s, zipf=args.zipf)
        for name, fn in (("dense", t.dense_step), ("wta", t.hashed_step), ("wta_other", t2.hashed_step)):
            start = time.perf_counter()
            fn(x, y)
            seconds[name] += time.perf_counter() - start
    x, y = ex.samples(protos, 4096, seed=99, zipf=args.zipf)
    score = lambda logits: (logits.argmax(1) == y).float().mean().item()  # noqa: E731

    @torch.no_grad()
    def scores(layer: WTAHashedLinear, timed: str) -> dict:
        layer.eval()
        dense = lambda v: F.linear(v, layer.weight, layer.bias)  # noqa: E731  its own weights, every row
        return {"accuracy": score(layer(x)), "exact_accuracy": score(dense(x)),
                "own_index_recall": recall(dense, layer, x), "seconds": seconds[timed]}

    with torch.no_grad():
        acc_d = score(t.dense(x))
    main, second = scores(t.hashed, "wta"), scores(t2.hashed, "wta_other")
    index = WTAHashedLinear.from_original(t.dense, **{**params, "index": "weights"}).eval()
    return {"steps": args.train_steps, "batch": args.batch, "lr": args.train_lr, "zipf": args.zipf, "bias": False,
            "index": params["index"], "dense_accuracy": acc_d, "wta_accuracy": main["accuracy"],
            "wta_trained_exact_accuracy": main["exact_accuracy"], "gap_points": (acc_d - main["accuracy"]) * 100,
            "wta_own_index_recall": main["own_index_recall"], f"with_{other}_index": second,
            "recall_on_dense_trained_head": recall(t.dense, index, x),
            "dense_seconds": seconds["dense"], "wta_seconds": seconds["wta"]}


def run_size(classes: int, args, ex) -> dict:
    torch.manual_seed(0)
    protos = ex.prototypes(classes, args.hidden, seed=0)
    head = nn.Linear(args.hidden, classes)
    with torch.no_grad():
        head.weight.copy_(protos * 8)
        head.bias.zero_()
    params = _hash_params(args)
    start = time.perf_counter()
    hashed = WTAHashedLinear.from_original(head, **params).eval()
    row = {"classes": classes, "hidden": args.hidden, "params": params,
           "table_build_s": time.perf_counter() - start}
    x, _ = ex.samples(protos, 2048, seed=1)
    row["recall"] = recall(head, hashed, x)
    row["inference"] = inference(head.eval(), hashed, x, (1, 16), args.rounds)
    del hashed
    init = nn.Linear(args.hidden, classes)  # training starts from nn.Linear's initialisation
    data = [ex.samples(protos, args.batch, seed=100 + i) for i in range(args.rebuild_every + args.timed_steps)]
    row["train_step"] = step_times(init, params, data, args.dense_steps, args.lr)
    row["train_step"]["batch"] = args.batch
    del data
    if classes in args.train_classes:
        row["training"] = train_accuracy(classes, params, ex, protos, args)
    print(json.dumps(row, indent=1), flush=True)
    return row


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--classes", type=int, nargs="+", default=[100_000, 500_000])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--num-hashes", type=int, default=480)
    p.add_argument("--bands", type=int, default=96)
    p.add_argument("--candidates", type=int, default=128)
    p.add_argument("--rebuild-every", type=int, default=50)
    p.add_argument("--index", choices=("weights", "inputs"), default="inputs",
                   help="what the tables hash per class when training: weight rows or the class's input mean")
    p.add_argument("--timed-steps", type=int, default=100, help="hashed training steps timed")
    p.add_argument("--dense-steps", type=int, default=10, help="dense training steps timed")
    p.add_argument("--lr", type=float, default=20.0, help="SGD learning rate of the timed steps")
    p.add_argument("--train-steps", type=int, default=300)
    p.add_argument("--train-classes", type=int, nargs="*", default=[100_000])
    p.add_argument("--train-lr", type=float, default=300.0, help="SGD learning rate of the accuracy comparison")
    p.add_argument("--zipf", type=float, default=1.0, help="label distribution of the accuracy comparison")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    ex = xc_example()
    rows = [run_size(c, args, ex) for c in args.classes]
    result = {**run_info(), "data": {"generator": "examples/xc.py", "spread": ex.SPREAD, "noise": ex.NOISE,
                                          "family": ex.FAMILY}, "rows": rows}
    if args.out:
        write_json(args.out, result)
    for r in rows:
        inf = r["inference"]
        print(f"{r['classes']:>7} classes: recall@1 {r['recall']['recall_at_1']:.3f}  train step "
              f"{r['train_step']['speedup']:.2f}×  inference b1 {inf['batch_1']['speedup_vs_dense']:.2f}× "
              f"b16 {inf['batch_16']['speedup_vs_dense']:.2f}×  (vs compiled b1 {inf['batch_1']['speedup_vs_compiled']:.2f}×)")
        if "training" in r:
            tr = r["training"]
            second = tr["with_weights_index" if tr["index"] == "inputs" else "with_inputs_index"]
            print(f"{'':>16}after {tr['steps']} steps: dense {tr['dense_accuracy']:.3f}, hashed ({tr['index']} index) "
                  f"{tr['wta_accuracy']:.3f} (its weights computed densely: {tr['wta_trained_exact_accuracy']:.3f}; "
                  f"other index {second['accuracy']:.3f}); recall@1 of a weight index over the dense-trained head "
                  f"{tr['recall_on_dense_trained_head']['recall_at_1']:.3f}")


if __name__ == "__main__":
    main()
