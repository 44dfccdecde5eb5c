"""The Kronecker paper's claim on models that learned something: train a CNN and a
transformer-style classifier here (and wide fully connected ones), rewrite them with `kron`
(convolutions and linears), recover with layer-wise training and distillation on unlabelled
training images, and report test accuracy, parameters and measured speed (best against best: the
faster of eager and torch.compile on each side) against the uncompressed model, per seed.

    python benchmarks/kron_trained.py --seeds 0 1 2 --out benchmarks/results/kron_trained_cpu.json
    python benchmarks/kron_trained.py --models digits_mlp digits_cnn digits_vit --seeds 0 1 2 \
        --out benchmarks/results/kron_trained_digits_cpu.json

Zhou et al. (arXiv 1512.09194) report 3.3× speed-up or 3.6× fewer parameters at under 1 point of
accuracy. Data: benchmarks/shapes.py (generated, seeded; 32×32, ten classes; the test set comes
from another seed), and for `digits_mlp` scikit-learn's handwritten digits (8×8; the fixed split of
examples/digits.py: 1,347 training images, 450 held out; the seed varies initialisation and
order). Training uses labels; compression does not (calibration = unlabelled training images).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import run_info, time_variants  # noqa: E402
from layerwise_cnn import accuracy, he_init, train, vgg_style  # noqa: E402
from shapes import make_shapes  # noqa: E402

import fxopt  # noqa: E402
from fxopt.bench import speedups, variants  # noqa: E402
from fxopt.layerwise import Layerwise  # noqa: E402
from fxopt.rules import parse  # noqa: E402
from fxopt.save import inference_module, write_json  # noqa: E402

SIZE = 32


def encoder_and_head(d: int, layers: int, heads: int, mlp: int, classes: int) -> tuple[nn.Module, ...]:
    """The ViT-style classifiers' shared part, built in this order (so seeded weights do not move):
    PyTorch encoder layers (pre-norm, GELU, no dropout), the final LayerNorm, the linear head."""
    layer = nn.TransformerEncoderLayer(d, heads, mlp, dropout=0.0, activation="gelu", batch_first=True,
                                       norm_first=True)
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=False), nn.LayerNorm(d), nn.Linear(d, classes)


class PatchTransformer(nn.Module):
    """A ViT-style classifier: 4×4 patches → d-dim tokens (+ learnt positions) → PyTorch encoder
    layers (pre-norm, GELU) → mean over tokens → linear head."""

    def __init__(self, d: int = 256, layers: int = 4, heads: int = 4, mlp: int = 1024, classes: int = 10):
        super().__init__()
        self.embed = nn.Conv2d(3, d, 4, stride=4)
        self.pos = nn.Parameter(torch.zeros(1, (SIZE // 4) ** 2, d))
        self.encoder, self.norm, self.head = encoder_and_head(d, layers, heads, mlp, classes)

    def forward(self, x):
        tokens = self.embed(x).flatten(2).transpose(1, 2) + self.pos
        return self.head(self.norm(self.encoder(tokens)).mean(1))


def wide_mlp(classes: int = 10) -> nn.Module:
    """The paper's first setting in small: a fully connected classifier whose hidden layers are wide
    enough (2048) for their matmuls to dominate, as in the large fully connected layers kron targets."""
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * SIZE * SIZE, 2048), nn.ReLU(), nn.Linear(2048, 2048), nn.ReLU(),
                         nn.Linear(2048, classes))


def digits_mlp(classes: int = 10) -> nn.Module:
    """A wide classifier of 8×8 digits (64 → 2048 → 2048 → 2048 → 10): its two 2048 × 2048 layers
    hold 95% of its parameters and multiply-adds, the shape of the large fully connected layers kron
    is for, on a task it learns (98% held out)."""
    return nn.Sequential(nn.Linear(64, 2048), nn.ReLU(), nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, 2048),
                         nn.ReLU(), nn.Linear(2048, classes))


class DigitsCNN(nn.Module):
    """A VGG-style classifier of 8×8 digits: 3×3 convolutions 1 → 32 → 64, pool, 64 → 128 → 128,
    pool, linear head (the paper's digit-recognition CNN in small)."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.Conv2d(128, 128, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Linear(128 * 2 * 2, classes)

    def forward(self, x):
        return self.head(self.features(x.view(-1, 1, 8, 8)).flatten(1))


class DigitsTransformer(nn.Module):
    """A ViT-style classifier of 8×8 digits: 2×2 patches → 16 tokens of width 128 (+ learnt
    positions) → two pre-norm PyTorch encoder layers (4 heads, GELU MLP of 512) → mean → head."""

    def __init__(self, d: int = 128, layers: int = 2, heads: int = 4, mlp: int = 512, classes: int = 10):
        super().__init__()
        self.embed = nn.Linear(4, d)
        self.pos = nn.Parameter(torch.zeros(1, 16, d))
        self.encoder, self.norm, self.head = encoder_and_head(d, layers, heads, mlp, classes)

    def forward(self, x):
        patches = x.view(-1, 4, 2, 4, 2).permute(0, 1, 3, 2, 4).reshape(-1, 16, 4)
        return self.head(self.norm(self.encoder(self.embed(patches) + self.pos)).mean(1))


MODELS = {"vgg": vgg_style, "vit": PatchTransformer, "mlp": wide_mlp, "digits_mlp": digits_mlp,
          "digits_cnn": DigitsCNN, "digits_vit": DigitsTransformer}
DIGITS = {"digits_mlp", "digits_cnn", "digits_vit"}
# Every conv but the stem and every linear but the head, at a parameter budget per layer; kron's
# FLOPs cap left at its rule default (no layer slower in FLOPs than dense).
LINEAR_RULE = ("version: 1\nrules:\n"
               "  - name: kron-linear\n    match: {op: linear, exclude: {last: true}}\n"
               "    substitute: kron\n    params: {compression: COMPRESSION}\n")
RULES = {
    "vgg": "version: 1\nrules:\n"
           "  - name: kron-conv\n    match: {op: conv2d, in_channels: {min: 32}, exclude: {first: true}}\n"
           "    substitute: kron\n    params: {compression: COMPRESSION}\n",
    "vit": LINEAR_RULE,
    "mlp": LINEAR_RULE,
    # for speed: the 2048 × 2048 layers as 6-term Kronecker sums (64×32 ⊗ 32×64, automatic factors):
    # 1/5 of their FLOPs, chosen by rank, not by a parameter budget
    "digits_mlp": "version: 1\nrules:\n"
                  "  - name: kron-wide\n    match: {op: linear, in_features: {min: 1024}, exclude: {last: true}}\n"
                  "    substitute: kron\n    params: {rank: 6, max_flops_ratio: null}\n",
    # every conv but the stem at a parameter budget of 1/8 each, FLOPs uncapped: the parameters fall,
    # the multiply-adds rise (KronConv's per-group convolutions; the paper's claim here is size)
    "digits_cnn": "version: 1\nrules:\n"
                  "  - name: kron-conv\n    match: {op: conv2d, exclude: {first: true}}\n"
                  "    substitute: kron\n    params: {compression: 8, max_flops_ratio: null}\n",
    # every linear inside the encoder layers; the rule's FLOPs cap (no more than the dense layer's)
    # sets the rank
    "digits_vit": "version: 1\nrules:\n"
                  "  - name: kron-linear\n    match: {op: linear, in_features: {min: 64}, exclude: {last: true}}\n"
                  "    substitute: kron\n    params: {compression: 4}\n",
}
# Settings that differ from the command line's for a model (a small dataset: more epochs, and more
# distillation steps over its 21 calibration batches).
DIGITS_COMPRESSION = {"distill_steps": 2400}
OVERRIDES = {"digits_mlp": {"epochs": 30} | DIGITS_COMPRESSION,
             "digits_cnn": {"epochs": 20, "lr": 2e-3} | DIGITS_COMPRESSION,
             "digits_vit": {"epochs": 40} | DIGITS_COMPRESSION}


def digits(seed: int):
    """The fixed split of examples/digits.py (the seed varies training only)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    from digits import split

    return split()


def run(name: str, seed: int, args, data) -> dict:
    (xtr, ytr), (xte, yte) = data
    args = argparse.Namespace(**(vars(args) | OVERRIDES.get(name, {})))
    torch.manual_seed(seed)
    model = MODELS[name]() if "vit" in name else he_init(MODELS[name]())
    lr = args.vit_lr if name == "vit" else args.lr
    train_s = train(model, xtr, ytr, args.epochs, 64, lr, seed)
    base = accuracy(model, xte, yte)
    print(f"{name} seed {seed}: trained in {train_s:.0f} s, test accuracy {base:.2f}%", flush=True)
    ruleset = parse(RULES[name].replace("COMPRESSION", f"{args.compression:g}"), f"kron rules for {name}")
    calib = [(xtr[i:i + 64],) for i in range(0, min(len(xtr), 64 * args.calib_batches), 64)]
    start = time.perf_counter()
    result = fxopt.optimize(model, (xtr[:args.batch],), ruleset, calibration=calib, time_sites=False,
                            layerwise=Layerwise(steps=args.layerwise_steps, lr=args.layerwise_lr,
                                                distill_steps=args.distill_steps, distill_lr=args.distill_lr,
                                                distill_sites=args.distill_sites),
                            source=f"{name}, seed {seed}")
    compress_s = time.perf_counter() - start
    rewritten = inference_module(result.program)  # what fxopt.load returns
    acc = accuracy(rewritten, xte, yte)
    t = time_variants(variants(model, rewritten, compiled=True), (xte[:args.batch],), args.rounds, args.min_run_time)
    e2e, totals = result.report["end_to_end"], result.report["totals"]
    out = {"model": name, "seed": seed, "rules": RULES[name].replace("COMPRESSION", f"{args.compression:g}"),
           "overrides": OVERRIDES.get(name, {}),
           "train_seconds": round(train_s, 1), "compress_seconds": round(compress_s, 1),
           "accuracy": {"original": base, "fxopt": acc, "change": round(acc - base, 2)},
           "params": [e2e["params_before"], e2e["params_after"]],
           "params_ratio": round(e2e["params_before"] / e2e["params_after"], 2),
           "flops_ratio": round(e2e["flops_before"] / max(e2e["flops_after"], 1), 2),
           "sites": {k: totals[k] for k in ("sites", "applied", "rolled_back", "skipped")},
           "us": {k: round(v * 1e6, 1) for k, v in t.items()}, "speedup": speedups(t, compiled=True)}
    print(f"{name} seed {seed}: {out['params_ratio']}× fewer params, accuracy {base:.2f} → {acc:.2f}, "
          f"speed-up best {out['speedup']['best']:.2f}×", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--compression", type=float, default=8.0, help="kron's parameter budget per rewritten layer")
    p.add_argument("--train", type=int, default=6000, help="training images")
    p.add_argument("--test", type=int, default=2000, help="test images (another seed)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--lr", type=float, default=1e-3, help="CNN training learning rate (Adam, one cycle)")
    p.add_argument("--vit-lr", type=float, default=1e-3)
    p.add_argument("--calib-batches", type=int, default=64, help="unlabelled training batches of 64 for compression")
    p.add_argument("--layerwise-steps", type=int, default=600)
    p.add_argument("--layerwise-lr", type=float, default=2e-3)
    p.add_argument("--distill-steps", type=int, default=800)
    p.add_argument("--distill-lr", type=float, default=1e-3)
    p.add_argument("--distill-sites", type=float, default=1.0)
    p.add_argument("--batch", type=int, default=64, help="batch size of the timed inference")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--min-run-time", type=float, default=0.3)
    args = p.parse_args()
    results, info = [], run_info()
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    for seed in args.seeds:
        shapes = None
        for name in args.models:
            if name in DIGITS:
                data = digits(seed)
            else:
                shapes = shapes or (make_shapes(args.train, SIZE, seed=seed), make_shapes(args.test, SIZE, seed=seed + 1000))
                data = shapes
            results.append(run(name, seed, args, data))
            write_json(args.out, {"run": info, "settings": settings, "results": results})  # after every model
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
