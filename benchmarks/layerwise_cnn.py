"""Zeng & Tian's table in small: train a VGG-style and an AlexNet-style CNN here, compress their
convolutions with `bottleneck` (or `separable`) substitutes plus layer-wise training, and report
measured speed-up (eager and under torch.compile, one run), parameters, FLOPs and test accuracy
against the uncompressed model.

    python benchmarks/layerwise_cnn.py --out benchmarks/results/layerwise_cnn_cpu.json

Data: benchmarks/shapes.py (generated, seeded). Training uses labels; compression does not: the
layer-wise training and the distillation see only unlabelled training images (the calibration
data), and accuracy is measured on a held-out test set generated from another seed.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import run_info, time_variants  # noqa: E402
from shapes import make_shapes  # noqa: E402

import fxopt  # noqa: E402
from fxopt.bench import speedups, variants  # noqa: E402
from fxopt.layerwise import Layerwise  # noqa: E402
from fxopt.rules import parse  # noqa: E402
from fxopt.save import inference_module, write_json  # noqa: E402

SIZE = 32


def vgg_style(classes: int = 10) -> nn.Module:
    """VGG's plan (stacks of 3×3 convs, ReLU, 2×2 max-pool, widths doubling; no batch norm, as in
    the original), at 32×32 with widths 64-128-256."""
    def stage(cin, cout):
        return [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(), nn.Conv2d(cout, cout, 3, padding=1), nn.ReLU(),
                nn.MaxPool2d(2)]
    return nn.Sequential(*stage(3, 64), *stage(64, 128), *stage(128, 256), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(256, classes))


def alexnet_style(classes: int = 10) -> nn.Module:
    """AlexNet's plan (a large-kernel stem, a 5×5 conv, three 3×3 convs, max-pools, a fully
    connected classifier), at 32×32."""
    return nn.Sequential(
        nn.Conv2d(3, 48, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(48, 128, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(128, 192, 3, padding=1), nn.ReLU(),
        nn.Conv2d(192, 192, 3, padding=1), nn.ReLU(),
        nn.Conv2d(192, 128, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(128 * 16, 256), nn.ReLU(), nn.Linear(256, classes))


def he_init(model: nn.Module) -> nn.Module:
    """He-normal weights, zero biases: without batch norm, PyTorch's default initialisation
    leaves these nets on a long plateau at chance level."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            nn.init.zeros_(m.bias)
    return model


MODELS = {"vgg": vgg_style, "alexnet": alexnet_style}


def rules(substitute: str, reduction: float):
    params = f"{{reduction: {reduction:g}}}" if substitute == "bottleneck" else "{multiplier: 1}"
    return parse(
        "version: 1\nrules:\n"
        f"  - name: {substitute}-conv\n"
        "    match: {op: conv2d, in_channels: {min: 32}, exclude: {first: true}}\n"
        f"    substitute: {substitute}\n    params: {params}\n"
        "    require_speedup: 1.2\n", f"{substitute} (reduction {reduction:g}, require_speedup 1.2)")


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, batch: int, lr: float, seed: int) -> float:
    """Adam with a cosine schedule; returns wall seconds."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * (len(x) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    model.train()
    start = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=g)
        for i in range(len(x) // batch):
            idx = order[i * batch:(i + 1) * batch]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    return time.perf_counter() - start


@torch.no_grad()
def accuracy(model, x: torch.Tensor, y: torch.Tensor, batch: int = 500) -> float:
    hits = sum((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum().item() for i in range(0, len(x), batch))
    return 100.0 * hits / len(x)


def run_model(name: str, args, data) -> dict:
    (xtr, ytr), (xte, yte) = data
    torch.manual_seed(args.seed)
    model = he_init(MODELS[name]())
    ckpt = args.checkpoints / f"{name}-n{args.train}-e{args.epochs}-lr{args.lr:g}-s{args.seed}.pt" \
        if args.checkpoints else None
    if ckpt is not None and ckpt.is_file():  # the same training run, kept: re-tune compression only
        saved = torch.load(ckpt, weights_only=True)
        model.load_state_dict(saved["state"])
        model.eval()
        train_s = saved["train_seconds"]
    else:
        train_s = train(model, xtr, ytr, args.epochs, 64, args.lr, args.seed)
        if ckpt is not None:
            ckpt.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"state": model.state_dict(), "train_seconds": train_s}, ckpt)
    base_acc = accuracy(model, xte, yte)
    print(f"{name}: trained in {train_s:.0f} s, test accuracy {base_acc:.2f}%", flush=True)

    example = (xtr[:args.batch],)
    calib = [(xtr[i:i + 64],) for i in range(0, min(len(xtr), 64 * args.calib_batches), 64)]
    start = time.perf_counter()
    result = fxopt.optimize(model, example, rules(args.substitute, args.reduction), calibration=calib,
                            layerwise=Layerwise(steps=args.layerwise_steps, lr=args.layerwise_lr,
                                                distill_steps=args.distill_steps, distill_lr=args.distill_lr),
                            source=f"{name}-style CNN")
    compress_s = time.perf_counter() - start
    rewritten = inference_module(result.program)  # what fxopt.load returns
    acc = accuracy(rewritten, xte, yte)
    print(f"{name}: compressed in {compress_s:.0f} s, test accuracy {acc:.2f}%", flush=True)

    t = time_variants(variants(model, rewritten, compiled=True), (xte[:args.batch],), args.rounds, args.min_run_time)
    e2e = result.report["end_to_end"]
    sites = [{k: s[k] for k in ("key", "status", "module_after", "params_before", "params_after", "flops_before",
                                 "flops_after", "reason")}
             | {"sqnr_db_init": (s["error_init"] or {}).get("sqnr_db"), "sqnr_db": (s["error"] or {}).get("sqnr_db"),
                "speedup": (s["latency"] or {}).get("speedup")}
             for s in result.report["sites"] if s["rule"]]
    out = {
        "model": name, "train_seconds": round(train_s, 1), "compress_seconds": round(compress_s, 1),
        "accuracy": {"original": base_acc, "fxopt": acc, "change": round(acc - base_acc, 2)},
        "us": {k: round(v * 1e6, 1) for k, v in t.items()},
        "speedup": speedups(t, compiled=True),
        "params": [e2e["params_before"], e2e["params_after"]],
        "conv_linear_flops": [e2e["flops_before"], e2e["flops_after"]],
        "top1_agreement": e2e["top1_agreement"],
        "sites": sites,
    }
    print(f"{name}: speed-up eager {out['speedup']['eager']:.2f}×, compiled {out['speedup']['compiled']:.2f}×, "
          f"accuracy {base_acc:.2f} → {acc:.2f}", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--substitute", default="bottleneck", choices=["bottleneck", "separable"])
    p.add_argument("--reduction", type=float, default=4.0)
    p.add_argument("--train", type=int, default=6000, help="training images")
    p.add_argument("--test", type=int, default=2000, help="test images (another seed)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--calib-batches", type=int, default=64, help="unlabelled training batches of 64 for compression")
    p.add_argument("--layerwise-steps", type=int, default=600)
    p.add_argument("--layerwise-lr", type=float, default=2e-3)
    p.add_argument("--distill-steps", type=int, default=800)
    p.add_argument("--distill-lr", type=float, default=1e-3)
    p.add_argument("--checkpoints", type=Path, default=None,
                   help="keep trained models here and reuse them (the training run is deterministic)")
    p.add_argument("--batch", type=int, default=64, help="batch size of the timed inference")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--min-run-time", type=float, default=0.5)
    args = p.parse_args()
    torch.manual_seed(args.seed)
    data = (make_shapes(args.train, SIZE, seed=args.seed), make_shapes(args.test, SIZE, seed=args.seed + 1000))
    results = [run_model(name, args, data) for name in args.models]
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "checkpoints")}
    write_json(args.out, {"run": run_info(), "settings": settings, "results": results})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
