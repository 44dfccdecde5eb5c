"""Training with binarized weights on real data: scikit-learn's bundled digits (Lin et al., arXiv
1510.03009, in small).

Data: `sklearn.datasets.load_digits`, 1,797 handwritten 8×8 digits (scanned, 10 classes), pixels
scaled to [0, 1]; a fixed stratified split, 1,347 training and 450 test images. Two models, an MLP
(64 → 512 → 512 → 10) and a small CNN (conv 32 → conv 64 → pool → fc 128 → 10), both with batch
norm as in the paper, each trained from the same initialisation in three ways:

* fp32:           ordinary training;
* binary:         BinaryConnect, deterministic: every Linear/Conv (first and last included, as in
                  the paper) binarized in the forward pass, straight-through gradients to latent
                  weights clipped to [−1, 1] (`fxopt.substitutes.binary.to_binary`);
* binary+qbp:     the same with quantized back-propagation: the weight gradients use the layer
                  inputs quantized to powers of two (3 exponent bits).

The binary models are evaluated after `packed_model`, i.e. as the 1-bit model fxopt saves: the
test accuracy is that of the packed weights. Each (model, way) runs over several seeds (the seed
sets the initialisation and the batch order; the split stays fixed).

    python benchmarks/binary_digits.py --out benchmarks/results/binary_digits_cpu.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import run_info  # noqa: E402

from fxopt.flops import storage_bytes  # noqa: E402
from fxopt.save import write_json  # noqa: E402
from fxopt.substitutes import constrain_  # noqa: E402
from fxopt.substitutes.binary import packed_model, to_binary  # noqa: E402

WAYS = {"fp32": None, "binary": {}, "binary+qbp": {"backprop_bits": 3}}


def digits(split_seed: int = 0):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target)
    idx_train, idx_test = train_test_split(range(len(y)), test_size=0.25, random_state=split_seed, stratify=y)
    return (x[idx_train], y[idx_train]), (x[idx_test], y[idx_test])


def mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(),
                         nn.Linear(64, 512), nn.BatchNorm1d(512), nn.ReLU(),
                         nn.Linear(512, 512), nn.BatchNorm1d(512), nn.ReLU(),
                         nn.Linear(512, 10), nn.BatchNorm1d(10))


def cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(64 * 4 * 4, 128), nn.BatchNorm1d(128), nn.ReLU(),
                         nn.Linear(128, 10), nn.BatchNorm1d(10))


MODELS = {"mlp": mlp, "cnn": cnn}


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item() * 100


def train(model: nn.Module, data, epochs: int, lr: float, seed: int, batch: int = 64) -> float:
    """Adam with a cosine schedule; latent binary weights are clipped after every step. Returns seconds."""
    (x, y), _ = data
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * -(-len(y) // batch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    start = time.perf_counter()
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), batch):
            idx = order[i:i + batch]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            constrain_([model])
    return time.perf_counter() - start


def run(name: str, way: str, seed: int, data, epochs: int, lr: float) -> dict:
    torch.manual_seed(seed)
    model = MODELS[name]()  # the same initialisation for every way of the same seed
    if WAYS[way] is not None:
        to_binary(model, **WAYS[way])
    seconds = train(model, data, epochs, lr, seed)
    dense_bytes = storage_bytes(model)
    if WAYS[way] is not None:
        acc_latent = accuracy(model, *data[1])  # deterministic binarization of the latent weights
        packed_model(model)
    acc = accuracy(model, *data[1])
    out = {"model": name, "way": way, "seed": seed, "test_accuracy": round(acc, 2),
           "train_seconds": round(seconds, 1), "bytes": storage_bytes(model)}
    if WAYS[way] is not None:
        assert abs(acc - acc_latent) < 1e-9, "packed model disagrees with the training form"
        out["bytes_training_form"] = dense_bytes
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, help="write the results here (JSON)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    args = ap.parse_args(argv)
    data = digits()
    runs = []
    for name in args.models:
        for way in WAYS:
            for seed in args.seeds:
                r = run(name, way, seed, data, args.epochs, args.lr)
                runs.append(r)
                print(f"{name:4} {way:11} seed {seed}: {r['test_accuracy']:6.2f} % test accuracy, "
                      f"{r['train_seconds']:5.1f} s, {r['bytes']:,} bytes", flush=True)
    summary = {}
    for name in args.models:
        for way in WAYS:
            accs = [r["test_accuracy"] for r in runs if r["model"] == name and r["way"] == way]
            summary[f"{name}/{way}"] = {"mean": round(statistics.mean(accs), 2), "min": min(accs), "max": max(accs)}
        for way in list(WAYS)[1:]:
            gap = summary[f"{name}/fp32"]["mean"] - summary[f"{name}/{way}"]["mean"]
            summary[f"{name}/{way}"]["gap_to_fp32"] = round(gap, 2)
    for key, s in summary.items():
        print(f"{key:16} mean {s['mean']:6.2f} %  (min {s['min']}, max {s['max']})"
              + (f"  gap to fp32 {s['gap_to_fp32']:+.2f} pt" if "gap_to_fp32" in s else ""))
    result = {**run_info(), "settings": {"epochs": args.epochs, "lr": args.lr, "batch": 64, "seeds": args.seeds,
                                         "split": "sklearn load_digits, stratified 75/25, random_state 0"},
              "runs": runs, "summary": summary}
    if args.out:
        write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
