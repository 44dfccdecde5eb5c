"""Kernel rescaling, the paper's table in small: training time and test accuracy of (a) training at
full resolution against (b) the rescaling schedule (train at half resolution with rescaled
kernels, carry the kernels up, refine at full resolution), from the same initialisation, for the
same number of epochs.

Data: the generated shapes-and-textures task (`benchmarks/shapes.py`) at 64×64: training and test
images from different seeds. Models, in the spirit of the paper's OverFeat and ResNet:

* `overfeat`: 7×7/2 → pool → 5×5 → pool → 3×3 → pool → fc 128 → fc 10 (batch norm); the 7×7 and
  5×5 kernels become 5×5 and 3×3 at half resolution, the fc layer reads a 2×2 instead of a 4×4 map;
* `resnet`: 7×7/2 stem → pool → two residual stages (3×3, 32 and 64 channels) → global average
  pool → fc 10; only the stem's kernel is rescaled, the 3×3 blocks run on smaller maps.

Both runs use SGD with momentum and one cosine learning-rate schedule over all epochs (the
schedule's low-resolution epochs come first). Wall time counts training and the rewrites, not
evaluation. Seeds set the data, the initialisation and the batch order.

    python benchmarks/rescale_cnn.py --out benchmarks/results/rescale_cnn_cpu.json
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import run_info  # noqa: E402
from shapes import make_shapes  # noqa: E402

from fxopt import rescale  # noqa: E402
from fxopt.save import write_json  # noqa: E402


def overfeat(size: int = 64, classes: int = 10) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 32, 7, stride=2, padding=3), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),   # 64 → 16
        nn.Conv2d(32, 64, 5, padding=2), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),             # → 8
        nn.Conv2d(64, 96, 3, padding=1), nn.BatchNorm2d(96), nn.ReLU(), nn.MaxPool2d(2),             # → 4
        nn.Flatten(), nn.Linear(96 * (size // 16) ** 2, 128), nn.ReLU(), nn.Linear(128, classes))


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = nn.Sequential() if stride == 1 and cin == cout else \
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.short(x))


def resnet(size: int = 64, classes: int = 10) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 32, 7, stride=2, padding=3, bias=False), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        Block(32, 32), Block(32, 64, stride=2), Block(64, 64),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, classes))


MODELS = {"overfeat": overfeat, "resnet": resnet}


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 500) -> float:
    model.eval()
    with torch.no_grad():
        hits = sum((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum().item() for i in range(0, len(y), batch))
    return 100.0 * hits / len(y)


class Trainer:
    """One epoch at a time, with one SGD optimizer state per model object and a cosine schedule
    over `total` epochs; inputs downsampled by the epoch's scale (precomputed once per scale)."""

    def __init__(self, x, y, total: int, batch: int, lr: float, seed: int):
        self.x, self.y, self.total, self.batch, self.lr = x, y, total, batch, lr
        self.gen = torch.Generator().manual_seed(seed)
        self.scaled = {1.0: x}
        self.opt: torch.optim.Optimizer | None = None
        self.owner = None

    def __call__(self, model: nn.Module, scale: float, epoch: int) -> None:
        if self.owner is not model:  # a new model object (the one carried up): fresh optimizer state
            self.opt = torch.optim.SGD(model.parameters(), lr=self.lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
            self.owner = model
        if scale not in self.scaled:
            self.scaled[scale] = rescale.downsample_input(self.x, scale)
        x = self.scaled[scale]
        steps = math.ceil(len(self.y) / self.batch)
        model.train()
        order = torch.randperm(len(self.y), generator=self.gen)
        for i in range(steps):
            t = (epoch * steps + i) / (self.total * steps)
            for group in self.opt.param_groups:
                group["lr"] = self.lr * 0.5 * (1 + math.cos(math.pi * t))
            idx = order[i * self.batch:(i + 1) * self.batch]
            loss = F.cross_entropy(model(x[idx]), self.y[idx])
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()


def run(name: str, args, data, seed: int) -> dict:
    (x, y), (xt, yt) = data
    torch.manual_seed(seed)
    init = MODELS[name](args.size)
    example = (x[:2],)
    out = {"model": name, "seed": seed}
    # (a) full resolution throughout
    model = copy.deepcopy(init)
    trainer = Trainer(x, y, args.epochs, args.batch, args.lr, seed)
    curve = []
    for epoch in range(args.epochs):
        t0 = time.perf_counter()
        trainer(model, 1.0, epoch)
        curve.append({"epoch": epoch + 1, "seconds": time.perf_counter() - t0})
        curve[-1]["test_accuracy"] = accuracy(model, xt, yt)
    out["full"] = {"seconds": round(sum(c["seconds"] for c in curve), 1), "test_accuracy": curve[-1]["test_accuracy"],
                   "curve": _rounded(curve)}
    # (b) the rescaling schedule: low-resolution epochs first, then full resolution
    trainer = Trainer(x, y, args.epochs, args.batch, args.lr, seed)
    low_epochs = args.low_epochs
    full, phases, low = rescale.schedule(copy.deepcopy(init), example, args.factor, low_epochs,
                                         args.epochs - low_epochs, trainer)
    out["rescaled"] = {"seconds": round(sum(p.seconds for p in phases), 1), "test_accuracy": accuracy(full, xt, yt),
                       "phases": [{"name": p.name, "epochs": p.epochs, "seconds": round(p.seconds, 1)} for p in phases],
                       "low_resolution_test_accuracy": accuracy(low.model, rescale.downsample_input(xt, args.factor), yt),
                       # the model the full-resolution phase started from (low.model is the trained one)
                       "carried_up_test_accuracy": accuracy(rescale.up(low, like=init), xt, yt) if low_epochs else None,
                       "layers": low.report()["layers"]}
    out["time_saved"] = round(1 - out["rescaled"]["seconds"] / out["full"]["seconds"], 3)
    out["accuracy_change"] = round(out["rescaled"]["test_accuracy"] - out["full"]["test_accuracy"], 2)
    checked = rescale.check(init.eval(), rescale.down(init, example, args.factor), example)
    out["untrained_round_trip_rel_l2"] = round(checked["round_trip_rel_l2"], 4)
    return out


def _rounded(curve):
    return [{k: round(v, 2) if isinstance(v, float) else v for k, v in c.items()} for c in curve]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--train", type=int, default=5000)
    ap.add_argument("--test", type=int, default=2000)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--low-epochs", type=int, default=4)
    ap.add_argument("--factor", type=float, default=2.0)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.02)  # 0.05 sent full-resolution overfeat to chance
    args = ap.parse_args(argv)
    rows = []
    for seed in args.seeds:
        data = (make_shapes(args.train, args.size, seed), make_shapes(args.test, args.size, seed + 1000))
        for name in args.models:
            r = run(name, args, data, seed)
            rows.append(r)
            print(f"{name:9} seed {seed}: full {r['full']['test_accuracy']:.2f}% in {r['full']['seconds']:.0f} s · "
                  f"rescaled {r['rescaled']['test_accuracy']:.2f}% in {r['rescaled']['seconds']:.0f} s · "
                  f"time saved {r['time_saved'] * 100:.0f}% · accuracy {r['accuracy_change']:+.2f} pt", flush=True)
    settings = {k: getattr(args, k) for k in ("train", "test", "size", "epochs", "low_epochs", "factor", "batch", "lr")}
    result = {**run_info(), "settings": settings, "threads": torch.get_num_threads(), "rows": rows}
    if args.out:
        write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
