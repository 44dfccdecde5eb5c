"""The gate: measure each applied site's latency, original layer against substitute, and keep a
substitute only where it pays.

A rule with `require_speedup: 1.2` keeps its substitute only when the original layer takes at
least 1.2× the substitute's time on the site's real input shape (random values; dtype and
device of the layer's weight), eager, on this machine. Every other applied site is timed too, so
the report says when a substitute that cuts parameters or FLOPs made its layer slower. Rounds that
disagree, or a speed-up far beyond the FLOP ratio, are timed again before they decide anything;
a figure still inconsistent is marked `unreliable` in the report.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .match import Site
from .timing import measure

PLAUSIBLE = 3.0  # a speed-up more than this × the FLOP ratio is re-timed before it is believed


def site_input(site: Site) -> torch.Tensor:
    """A random input of the site's recorded shape and dtype, on its layer's device (for timing)."""
    return torch.randn(site.in_shape, dtype=site.input.meta["tensor_meta"].dtype, device=site.module.weight.device)


def site_latency(site: Site, module: nn.Module, rounds: int = 3, min_run_time: float = 0.02,
                 flop_ratio: float | None = None) -> dict[str, Any]:
    """{"original_us", "substitute_us", "speedup", "device"} of one site (speedup = original /
    substitute), and "unreliable" (why) where the timings stayed inconsistent: rounds that
    disagree, or a speed-up beyond `PLAUSIBLE` × the FLOP ratio (`flop_ratio`: original ÷
    substitute FLOPs), each re-timed first (fxopt/timing.py)."""
    x = site_input(site)

    def implausible(t: dict[str, float]) -> str | None:
        speedup = t["original"] / t["substitute"]
        if flop_ratio and speedup > PLAUSIBLE * max(flop_ratio, 1.0):
            return f"speed-up {speedup:.1f}× far beyond the FLOP ratio {flop_ratio:.1f}×"
        return None

    t = measure({"original": site.module, "substitute": module}, (x,), rounds, min_run_time, implausible)
    s = t.seconds
    out = {"original_us": round(s["original"] * 1e6, 2), "substitute_us": round(s["substitute"] * 1e6, 2),
           "speedup": round(s["original"] / s["substitute"], 3), "device": str(x.device), "retimed": t.retimed}
    if t.unreliable:
        out["unreliable"] = t.unreliable
    return out


def verdict(latency: dict[str, Any], require_speedup: float | None) -> str | None:
    """Why the gate keeps the original layer, or None when the substitute passes."""
    if require_speedup is None or latency["speedup"] >= require_speedup:
        return None
    return (f"gate: {latency['speedup']:.2f}× the original's speed < require_speedup {require_speedup:g} "
            f"({latency['original_us']:.1f} µs → {latency['substitute_us']:.1f} µs); original kept")
