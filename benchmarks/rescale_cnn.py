"""Kernel rescaling, the paper's table in small: training time and test accuracy of (a) training at
full resolution for `--epochs` epochs against (b) the rescaling schedule (`--low-epochs` at half
resolution with rescaled kernels, carry the kernels up, re-estimate the batch-norm statistics on
`--bn-images` training images, refine `--full-epochs` at full resolution), from the same
initialisation.

Data: the generated shapes-and-textures task (`benchmarks/shapes.py`) at 64×64: training and test
images from different seeds. Models, in the spirit of the paper's OverFeat and ResNet, batch norm
in all of them:

* `overfeat_large`: 7×7/2 → pool → 5×5 → pool → 5×5 → pool → fc 128 → fc 10; every spatial
  kernel is rescaled (7×7 → 5×5, 5×5 → 3×3), the fc layer reads a 2×2 instead of a 4×4 map;
* `resnet_dw`: 7×7/2 stem → pool → residual blocks of a 5×5 depthwise conv and two 1×1 convs
  (ConvNeXt-like; 32, then 64 channels after an average pool and a 1×1 conv) → global average
  pool → fc 10; the stem and the depthwise kernels are rescaled, 1×1 convs need nothing;
* `overfeat`, `resnet`: the same with 3×3 kernels (`overfeat`'s third conv, `resnet`'s blocks:
  3×3 basic blocks, stride-2 downsampling), which cannot shrink and so run unchanged on maps half
  as fine; the carried-up models of these start their full-resolution phase near chance (see the
  README).

Both runs use SGD with momentum (Nesterov, weight decay 5e-4) and cosine learning-rate
schedules: the full-resolution run one over its epochs from `--lr`; the rescaled run one over its
low-resolution epochs from `--lr`, and a fresh one over its full-resolution epochs from
`--full-lr` × `--lr` (the carried-up model is a new start: one schedule over both phases left
the carry-up at 40% of the peak rate and ended 1–2 points lower). Wall time counts training, the
rewrites and the batch-norm re-estimation, not evaluation. Seeds set the data, the
initialisation and the batch order.

One seed's accuracy change is one draw from the run-to-run noise of training: `--replicates N`
trains the full-resolution run N more times from the same initialisation with other batch orders,
and the summary gives, per model, the mean change over seeds with its 95% confidence interval
next to the same statistics for the full-resolution run against itself.

    python benchmarks/rescale_cnn.py --out benchmarks/results/rescale_cnn_cpu.json
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import time
from pathlib import Path

import scipy.stats
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import run_info  # noqa: E402
from shapes import make_shapes  # noqa: E402

from fxopt import rescale  # noqa: E402
from fxopt.save import write_json  # noqa: E402


def overfeat(size: int = 64, classes: int = 10, third: int = 3) -> nn.Module:
    """7×7/2 → 5×5 → `third`×`third`, each followed by batch norm, ReLU and a 2×2 max pool."""
    return nn.Sequential(
        nn.Conv2d(3, 32, 7, stride=2, padding=3), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),   # 64 → 16
        nn.Conv2d(32, 64, 5, padding=2), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),             # → 8
        nn.Conv2d(64, 96, third, padding=third // 2), nn.BatchNorm2d(96), nn.ReLU(), nn.MaxPool2d(2),  # → 4
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


def overfeat_large(size: int = 64, classes: int = 10) -> nn.Module:
    return overfeat(size, classes, third=5)


class DepthwiseBlock(nn.Module):
    """x + BN(1×1(ReLU(1×1(BN(depthwise 5×5(x)))))), then ReLU: the spatial work is one 5×5 kernel
    per channel, which rescales; the 1×1 convs mix channels and are the same at any resolution."""

    def __init__(self, c: int):
        super().__init__()
        self.dw = nn.Conv2d(c, c, 5, padding=2, groups=c, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.expand = nn.Conv2d(c, 2 * c, 1)
        self.project = nn.Conv2d(2 * c, c, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        return F.relu(x + self.bn2(self.project(F.relu(self.expand(self.bn1(self.dw(x)))))))


def resnet_dw(size: int = 64, classes: int = 10) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 32, 7, stride=2, padding=3, bias=False), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        DepthwiseBlock(32), nn.AvgPool2d(2), nn.Conv2d(32, 64, 1, bias=False), nn.BatchNorm2d(64),
        DepthwiseBlock(64), DepthwiseBlock(64),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, classes))


MODELS = {"overfeat_large": overfeat_large, "resnet_dw": resnet_dw, "overfeat": overfeat, "resnet": resnet}


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 500) -> float:
    model.eval()
    with torch.no_grad():
        hits = sum((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum().item() for i in range(0, len(y), batch))
    return 100.0 * hits / len(y)


class Trainer:
    """One epoch at a time, with one SGD optimizer state per model object; inputs downsampled by
    the epoch's scale (precomputed once per scale). `phases` maps each scale, in training order,
    to (epochs, peak learning rate): each phase has its own cosine schedule from its peak to 0."""

    def __init__(self, x, y, phases: dict[float, tuple[int, float]], batch: int, seed: int):
        self.x, self.y, self.batch = x, y, batch
        self.phases, self.first = phases, {}
        start = 0
        for scale, (epochs, _) in phases.items():
            self.first[scale], start = start, start + epochs
        self.gen = torch.Generator().manual_seed(seed)
        self.scaled = {1.0: x}
        self.opt: torch.optim.Optimizer | None = None
        self.owner = None

    def __call__(self, model: nn.Module, scale: float, epoch: int) -> None:
        total, peak = self.phases[scale]
        if self.owner is not model:  # a new model object (the one carried up): fresh optimizer state
            self.opt = torch.optim.SGD(model.parameters(), lr=peak, momentum=0.9, weight_decay=5e-4, nesterov=True)
            self.owner = model
        if scale not in self.scaled:
            self.scaled[scale] = rescale.downsample_input(self.x, scale)
        x = self.scaled[scale]
        steps = math.ceil(len(self.y) / self.batch)
        model.train()
        order = torch.randperm(len(self.y), generator=self.gen)
        for i in range(steps):
            t = ((epoch - self.first[scale]) * steps + i) / (total * steps)
            for group in self.opt.param_groups:
                group["lr"] = peak * 0.5 * (1 + math.cos(math.pi * t))
            idx = order[i * self.batch:(i + 1) * self.batch]
            loss = F.cross_entropy(model(x[idx]), self.y[idx])
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()


def train_full(init: nn.Module, data, args, order_seed: int, curve: bool = True) -> dict:
    """`args.epochs` epochs at full resolution from a copy of `init`, batches in the order that
    `order_seed` draws; the test accuracy after every epoch (`curve`) or only the last."""
    (x, y), (xt, yt) = data
    model = copy.deepcopy(init)
    trainer = Trainer(x, y, {1.0: (args.epochs, args.lr)}, args.batch, order_seed)
    epochs = []
    for epoch in range(args.epochs):
        t0 = time.perf_counter()
        trainer(model, 1.0, epoch)
        epochs.append({"epoch": epoch + 1, "seconds": time.perf_counter() - t0})
        if curve or epoch == args.epochs - 1:
            epochs[-1]["test_accuracy"] = accuracy(model, xt, yt)
    out = {"seconds": round(sum(c["seconds"] for c in epochs), 1), "test_accuracy": epochs[-1]["test_accuracy"]}
    if curve:
        out["curve"] = _rounded(epochs)
    else:
        out["order_seed"] = order_seed
    return out


def run(name: str, args, data, seed: int) -> dict:
    (x, y), (xt, yt) = data
    torch.manual_seed(seed)
    init = MODELS[name](args.size)
    example = (x[:2],)
    out = {"model": name, "seed": seed}
    # (a) full resolution throughout; replicates: the same again with other batch orders
    out["full"] = train_full(init, data, args, seed)
    if args.replicates:
        out["replicates"] = [train_full(init, data, args, seed + 100 * k, curve=False)
                             for k in range(1, args.replicates + 1)]
    # (b) the rescaling schedule: low-resolution epochs first, then full resolution
    low_epochs, full_epochs = args.low_epochs, args.full_epochs
    trainer = Trainer(x, y, {args.factor: (low_epochs, args.lr), 1.0: (full_epochs, args.lr * args.full_lr)}, args.batch,
                      seed)
    bn_batches = [x[i:i + 100] for i in range(0, min(args.bn_images, len(x)), 100)] or None
    full, phases, low = rescale.schedule(copy.deepcopy(init), example, args.factor, low_epochs, full_epochs,
                                         trainer, bn_batches=bn_batches)
    out["rescaled"] = {"seconds": round(sum(p.seconds for p in phases), 1), "test_accuracy": accuracy(full, xt, yt),
                       "phases": [{"name": p.name, "epochs": p.epochs, "seconds": round(p.seconds, 1)} for p in phases],
                       "low_resolution_test_accuracy": accuracy(low.model, rescale.downsample_input(xt, args.factor), yt),
                       "layers": low.report()["layers"]}
    # the model the full-resolution phase started from (low.model is the trained one), before and
    # after the batch-norm re-estimation
    carried = rescale.up(low, like=init) if low_epochs else None
    out["rescaled"]["carried_up_test_accuracy"] = accuracy(carried, xt, yt) if carried is not None else None
    out["rescaled"]["recalibrated_test_accuracy"] = \
        accuracy(rescale.recalibrate(carried, bn_batches), xt, yt) if carried is not None and bn_batches else None
    out["time_saved"] = round(1 - out["rescaled"]["seconds"] / out["full"]["seconds"], 3)
    out["accuracy_change"] = round(out["rescaled"]["test_accuracy"] - out["full"]["test_accuracy"], 2)
    if args.replicates:  # the full-resolution run against itself: the noise an accuracy change sits in
        out["replicate_change"] = [round(r["test_accuracy"] - out["full"]["test_accuracy"], 2) for r in out["replicates"]]
    checked = rescale.check(init.eval(), rescale.down(init, example, args.factor), example)
    out["untrained_round_trip_rel_l2"] = round(checked["round_trip_rel_l2"], 4)
    return out


def summarize(rows: list[dict]) -> dict:
    """Per model, over seeds: time saved (mean, range) and the accuracy change's mean with a 95%
    confidence interval (Student's t over the per-seed differences, which pair runs from the same
    initialisation and data); with replicates, the same for the full-resolution run against
    itself under another batch order, the run-to-run noise a single seed's change sits in."""
    out = {}
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        saved = [r["time_saved"] for r in mine]
        out[model] = {"seeds": [r["seed"] for r in mine],
                      "time_saved": {"mean": round(statistics.fmean(saved), 3), "min": min(saved), "max": max(saved)},
                      "accuracy_change": _mean_ci([r["accuracy_change"] for r in mine])}
        noise = [d for r in mine for d in r.get("replicate_change", [])]
        if noise:
            out[model]["replicate_change"] = {**_mean_ci(noise), "max_abs": max(abs(d) for d in noise)}
    return out


def _mean_ci(values: list[float]) -> dict:
    mean = statistics.fmean(values)
    if len(values) < 2:
        return {"mean": round(mean, 2), "n": len(values)}
    sd = statistics.stdev(values)
    half = scipy.stats.t.ppf(0.975, len(values) - 1) * sd / math.sqrt(len(values))
    return {"mean": round(mean, 2), "sd": round(sd, 2), "ci95": [round(mean - half, 2), round(mean + half, 2)],
            "n": len(values)}


def _rounded(curve):
    return [{k: round(v, 2) if isinstance(v, float) else v for k, v in c.items()} for c in curve]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path)
    ap.add_argument("--models", nargs="+", default=["overfeat_large", "resnet_dw"], choices=list(MODELS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--train", type=int, default=5000)
    ap.add_argument("--test", type=int, default=2000)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=10, help="epochs of the full-resolution run")
    ap.add_argument("--low-epochs", type=int, default=8, help="rescaled run: epochs at 1/factor resolution")
    ap.add_argument("--full-epochs", type=int, default=6, help="rescaled run: epochs at full resolution after")
    ap.add_argument("--replicates", type=int, default=0,
                    help="extra full-resolution runs per seed, same initialisation, other batch orders (the noise floor)")
    ap.add_argument("--bn-images", type=int, default=1000,
                    help="training images the carried-up model's batch-norm statistics are re-estimated on (0: none)")
    ap.add_argument("--factor", type=float, default=2.0)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.02)  # 0.05 sent full-resolution overfeat to chance
    ap.add_argument("--full-lr", type=float, default=0.5,
                    help="rescaled run: peak learning rate of the full-resolution phase, as a fraction of --lr")
    args = ap.parse_args(argv)
    if args.replicates < 0:
        ap.error(f"--replicates: expected 0 or more, got {args.replicates}")
    rows = []
    for seed in args.seeds:
        data = (make_shapes(args.train, args.size, seed), make_shapes(args.test, args.size, seed + 1000))
        for name in args.models:
            r = run(name, args, data, seed)
            rows.append(r)
            print(f"{name:9} seed {seed}: full {r['full']['test_accuracy']:.2f}% in {r['full']['seconds']:.0f} s · "
                  f"rescaled {r['rescaled']['test_accuracy']:.2f}% in {r['rescaled']['seconds']:.0f} s · "
                  f"time saved {r['time_saved'] * 100:.0f}% · accuracy {r['accuracy_change']:+.2f} pt"
                  + (f" · replicates {r['replicate_change']}" if args.replicates else ""), flush=True)
    settings = {k: getattr(args, k) for k in ("train", "test", "size", "epochs", "low_epochs", "full_epochs", "bn_images",
                                              "factor", "batch", "lr", "full_lr", "replicates")}
    summary = summarize(rows)
    for name, m in summary.items():
        change = m["accuracy_change"]
        ci = f" (95% CI {change['ci95'][0]:+.2f} to {change['ci95'][1]:+.2f})" if "ci95" in change else ""
        noise = m.get("replicate_change")
        print(f"{name:9} over seeds {m['seeds']}: time saved {m['time_saved']['mean'] * 100:.0f}% "
              f"({m['time_saved']['min'] * 100:.0f}–{m['time_saved']['max'] * 100:.0f}%) · accuracy {change['mean']:+.2f} pt{ci}"
              + (f" · full vs full: sd {noise.get('sd', 0):.2f} pt, max |Δ| {noise['max_abs']:.2f} pt" if noise else ""))
    result = {**run_info(), "settings": settings, "threads": torch.get_num_threads(), "summary": summary, "rows": rows}
    if args.out:
        write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
