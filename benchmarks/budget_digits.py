"""The accuracy budget against per-site tolerances, on a trained model with a held-out metric.

The model is fxopt's demo, examples/digits.py (a trained digit classifier; `evaluate()`: accuracy
on 450 held-out images). Every linear layer but the head becomes a low-rank pair at several
compression levels (`max_flops_ratio`), and two ways of refusing damage are compared at a budget
of 1 point of held-out accuracy:

* search:     no per-site tolerance; `end_to_end: {metrics: {accuracy: {max_drop: 1}}, enforce: true}`
              rolls back the most harmful sites, as measured on evaluate(), until the budget holds;
* tolerance:  a single per-site tolerance (`cosine` from 0.3 to 0.999, the knob fxopt had before),
              no search; the best one is the one that saves the most parameters while the saved
              model still meets the budget.

The search may give a rolled-back layer back less compressed (twice the FLOPs budget per rung,
lowrank's ladder), which a tolerance cannot; so besides the best tolerance at the same ratio, the
results name the best (ratio, tolerance) pair of the whole sweep, which a user tuning both knobs
by hand, with the held-out metric in view, would find.

    python benchmarks/budget_digits.py --out benchmarks/results/budget_digits_cpu.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import run_info  # noqa: E402

import fxopt  # noqa: E402
from fxopt import rules  # noqa: E402
from fxopt.save import write_json  # noqa: E402
from fxopt.trace import load_model_file  # noqa: E402

COSINES = (0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999)


def ruleset(ratio: float, tolerance: float | None, budget: float, enforce: bool) -> rules.RuleSet:
    tol = f", tolerance: {{cosine: {tolerance}}}" if tolerance is not None else ""
    return rules.parse(
        "version: 1\nrules:\n  - {match: {op: linear, in_features: {min: 64}, out_features: {min: 128}}, "
        f"substitute: lowrank, params: {{max_flops_ratio: {ratio}}}{tol}}}\n"
        f"end_to_end: {{metrics: {{accuracy: {{max_drop: {budget}}}}}{', enforce: true' if enforce else ''}}}\n",
        f"ratio {ratio}, " + (f"cosine {tolerance}" if tolerance is not None else "search"))


def outcome(spec, rs) -> dict:
    start = time.perf_counter()
    result = fxopt.optimize(spec.model, spec.example_inputs, rs, calibration=list(spec.calibration_data()),
                            evaluate=spec.evaluate, time_sites=False)
    r = result.report
    e, acc = r["end_to_end"], r["end_to_end"]["metrics"]["accuracy"]
    return {"accuracy_before": acc["before"], "accuracy_after": acc["after"], "drop": acc["before"] - acc["after"],
            "params_before": e["params_before"], "params_after": e["params_after"],
            "params_saved": e["params_before"] - e["params_after"],
            "applied": [s["key"] for s in r["sites"] if s["status"] == "applied"],
            "max_flops_ratio": {s["key"]: s["params"].get("max_flops_ratio") for s in r["sites"] if s["status"] == "applied"},
            "evaluations": (r["budget"] or {}).get("evaluations"), "seconds": round(time.perf_counter() - start, 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ratios", type=float, nargs="+", default=[0.125, 0.0625, 0.03, 0.015])
    p.add_argument("--budget", type=float, default=1.0, help="points of held-out accuracy")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    info = run_info()
    spec = load_model_file(ROOT / "examples" / "digits.py")
    rows = []
    for ratio in args.ratios:
        search = outcome(spec, ruleset(ratio, None, args.budget, enforce=True))
        sweep = {c: outcome(spec, ruleset(ratio, c, args.budget, enforce=False)) for c in COSINES}
        meeting = {c: o for c, o in sweep.items() if o["drop"] <= args.budget}
        best = max(meeting, key=lambda c: (meeting[c]["params_saved"], -c)) if meeting else None
        rows.append({"ratio": ratio, "search": search, "tolerances": {str(c): o for c, o in sweep.items()},
                     "best_tolerance": best, "best": meeting.get(best)})
        b = meeting.get(best)
        print(f"ratio {ratio}: search saves {search['params_saved']:,} params (drop {search['drop']:+.2f} pt, "
              f"{search['evaluations']} evaluations); best tolerance cosine {best}: "
              + (f"{b['params_saved']:,} (drop {b['drop']:+.2f} pt)" if b else "none meets the budget"), flush=True)
    pairs = [(r["ratio"], r["best_tolerance"], r["best"]) for r in rows if r["best"]]
    overall = max(pairs, key=lambda p: p[2]["params_saved"]) if pairs else None
    if overall:
        print(f"best (ratio, tolerance) of the whole sweep: ratio {overall[0]}, cosine {overall[1]}: "
              f"{overall[2]['params_saved']:,} params saved", flush=True)
    write_json(args.out, info | {"model": "examples/digits.py", "budget_points": args.budget,
                                 "cosines": list(COSINES), "rows": rows,
                                 "best_of_sweep": overall and {"ratio": overall[0], "cosine": overall[1]} | overall[2]})


if __name__ == "__main__":
    main()
