"""Timing: the original model against the rewritten one, eager and under torch.compile, end to end
and per rewritten site, side by side in one process.

Each figure is the median, over interleaved rounds, of torch.utils.benchmark medians taken after
warm-up (compilation happens there). Ratios are original time / rewritten time (> 1: faster);
"best" compares the faster of eager and compiled on each side, so a rewritten model is never
credited for being compiled against an uncompiled original. End to end, the rewritten side is the
exported program as `fxopt.load` returns it (fxopt.save.inference_module). Per-site timings run
each original layer and its substitute on a random input of the site's recorded shape. Rounds that
disagree are timed again; a figure that stays inconsistent is marked `unreliable`
(fxopt/timing.py).

    >>> timings = bench(model, example_inputs, "kron")          # doctest: +SKIP
    >>> timings["end_to_end"]["speedup"]["best"]
"""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from .budget import Evaluate
from .gate import site_input
from .layerwise import Layerwise
from .pipeline import Result, optimize
from .rules import RuleSet
from .save import inference_module
from .timing import Timing, measure
from .validate import eval_mode


def speedups(t: dict[str, float], compiled: bool) -> dict[str, float | None]:
    """original/rewritten ratios from timings keyed original, fxopt (and their +compile forms)."""
    out = {"eager": round(t["original"] / t["fxopt"], 3), "compiled": None, "best": None}
    if compiled:
        out["compiled"] = round(t["original+compile"] / t["fxopt+compile"], 3)
        out["best"] = round(min(t["original"], t["original+compile"]) / min(t["fxopt"], t["fxopt+compile"]), 3)
    else:
        out["best"] = out["eager"]
    return out


def variants(original: nn.Module, rewritten: nn.Module, compiled: bool) -> dict[str, Any]:
    """original and fxopt callables, and (compiled) both under torch.compile, keyed as `speedups` reads them."""
    variants = {"original": original, "fxopt": rewritten}
    if compiled:
        torch._dynamo.reset()  # a clean cache: past its recompile limit Dynamo silently runs eager
        variants |= {"original+compile": torch.compile(original, dynamic=False),
                     "fxopt+compile": torch.compile(rewritten, dynamic=False)}
    return variants


def _row(t: Timing, compiled: bool) -> dict[str, Any]:
    """µs per variant and speed-ups; `unreliable` (why) where the rounds stayed inconsistent."""
    row = {"us": {k: round(v * 1e6, 2) for k, v in t.seconds.items()}, "speedup": speedups(t.seconds, compiled),
           "retimed": t.retimed}
    return row | ({"unreliable": t.unreliable} if t.unreliable else {})


def environment(device: torch.device) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({cpu})",
            "cpu": cpu, "threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__}


def bench(model: nn.Module, example_inputs: tuple, rules: str | Path | RuleSet, *, compile: bool = True,
          rounds: int = 3, min_run_time: float = 0.2, calibration: Iterable[tuple] | None = None,
          result: Result | None = None, source: str | None = None, layerwise: Layerwise | None = None,
          evaluate: Evaluate | None = None) -> dict[str, Any]:
    """Optimize `model` by `rules` (or take a given `result`) and time it against the original."""
    result = result or optimize(model, example_inputs, rules, calibration=calibration, source=source,
                                layerwise=layerwise, evaluate=evaluate)
    inputs = tuple(example_inputs)
    with eval_mode(model):
        t = measure(variants(model, inference_module(result.program), compile), inputs, rounds, min_run_time)
    e2e = _row(t, compile)
    sites = []
    for site, substitute in result.substitutes:
        ts = measure(variants(site.module, substitute, compile), (site_input(site),), rounds, min_run_time)
        sites.append({"name": site.key, "substitute": type(substitute).__name__, "input_shape": list(site.in_shape),
                      **_row(ts, compile)})
    device = inputs[0].device if inputs else torch.device("cpu")
    return {
        "model": source or type(model).__name__, "rules": result.report["rules"], "compiled": compile,
        "rounds": rounds, "min_run_time": min_run_time, "environment": environment(device),
        "input_shapes": [list(x.shape) for x in inputs],
        "end_to_end": e2e, "sites": sites,
        "accuracy": {k: result.report["end_to_end"][k] for k in ("max_abs", "rel_l2", "sqnr_db", "cosine", "top1_agreement")},
        "metrics": result.report["end_to_end"].get("metrics", {}),
        "size": {k: result.report["end_to_end"][k] for k in ("params_before", "params_after", "flops_before", "flops_after")},
        "training": result.report.get("training", {}),
    }
