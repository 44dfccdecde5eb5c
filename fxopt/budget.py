"""The user's metric and the accuracy budget (docs/architecture.md, "Accuracy budget").

`evaluate(model) -> {name: number}`, defined by the model file, is run on the original model and on
the saved program; the rule file may bound how far each metric moves the wrong way
(`end_to_end.metrics`, rules.MetricBound) besides the output tolerances (`end_to_end`).

With `end_to_end.enforce`, a rewritten model that misses a bound is repaired by rolling sites back,
the most harmful first, where harm is measured, not guessed: the model with every accepted site
applied is evaluated, then the model with each site alone rolled back (one evaluation per site;
above `MAX_PROBES` sites, neighbours in execution order are probed and rolled back together, so
that a model with hundreds of sites costs at most `MAX_PROBES` probes). Sites go back in order of
how much their removal moved the bounds towards holding, re-evaluating after each, until every
bound holds. Then each rolled-back unit is tried again, least harmful first, climbing its ladder:
the substitute as the rule built it, then up to `MAX_RUNGS` less compressive versions (the
technique's `SubstituteSpec.relax`: twice the rank, half the reduction, ...), and it is re-applied
at the first rung where the bounds still hold. A technique without a ladder (binary, wta_hash) is
applied or rolled back. In all: 1 + probes + rollbacks + (rungs tried) evaluations, at most
1 + 2·MAX_PROBES + MAX_PROBES·(1 + MAX_RUNGS).

The candidates are evaluated through `Switched`, an fx Interpreter run of the traced graph in
which the chosen sites' outputs come from their substitutes: the graph is not changed, so no
re-tracing or re-export happens during the search.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import fx, nn

from . import rules as rules_mod
from .errors import FxoptError
from .match import Site

MAX_PROBES = 32
MAX_RUNGS = 4  # less compressive versions tried per rolled-back unit (each about twice the capacity)
Evaluate = Callable[[nn.Module], dict[str, float]]


def run_evaluate(evaluate: Evaluate, model: nn.Module, what: str) -> dict[str, float]:
    """`evaluate(model)` as a dict of floats; a failure or a wrong return is one line naming it."""
    from .trace import _where

    try:
        result = evaluate(model)
    except FxoptError:
        raise
    except Exception as exc:
        raise FxoptError(f"evaluate() failed on {what}: {_where(exc)}{type(exc).__name__}: {exc}") from None
    if not isinstance(result, dict) or not result:
        raise FxoptError(f"evaluate() must return a non-empty dict of metric name → number, got "
                         f"{type(result).__name__} (on {what})")
    out = {}
    for name, value in result.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if not isinstance(name, str) or isinstance(value, bool) or not isinstance(value, (int, float)):
            raise FxoptError(f"evaluate() must return a dict of metric name → number; {name!r} is "
                             f"{type(value).__name__} (on {what})")
        out[name] = float(value)
    return out


def check_bounded(ruleset: rules_mod.RuleSet, metrics: dict[str, float] | None) -> None:
    """Every metric the rule file bounds is one that evaluate() returns (checked before any work)."""
    for bound in ruleset.metrics:
        if metrics is None:
            raise FxoptError(f"{bound.where}: end_to_end.metrics bounds {bound.name!r}, but the model defines "
                             "no evaluate(model) -> dict of metrics")
        if bound.name not in metrics:
            raise FxoptError(f"{bound.where}: end_to_end.metrics bounds {bound.name!r}, but evaluate() returns "
                             f"only {', '.join(sorted(metrics))}")


def metric_changes(before: dict[str, float], after: dict[str, float]) -> dict[str, dict[str, float]]:
    """{name: {before, after, change}} for every metric evaluate() returned."""
    return {k: {"before": v, "after": after.get(k, math.nan), "change": after.get(k, math.nan) - v}
            for k, v in before.items()}


def metric_violations(ruleset: rules_mod.RuleSet, before: dict[str, float], after: dict[str, float]) -> list[str]:
    return [v for b in ruleset.metrics if (v := b.violation(before[b.name], after.get(b.name, math.nan)))]


class _SwitchedRun(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, swaps: dict[fx.Node, tuple[fx.Node, nn.Module]]):
        super().__init__(gm)
        self.swaps = swaps

    def run_node(self, n: fx.Node):
        swap = self.swaps.get(n)
        if swap is None:
            return super().run_node(n)
        source, module = swap
        return module(self.env[source])


class Switched(nn.Module):
    """The traced model with the sites in `on` computed by their substitutes (the rest as traced);
    `chosen` holds each site's substitute (the search swaps in its less compressive rungs)."""

    def __init__(self, gm: fx.GraphModule, pairs: Sequence[tuple[Site, nn.Module]]):
        super().__init__()
        self.gm, self.subs = gm, nn.ModuleList(m for _, m in pairs)
        self.sites = [site for site, _ in pairs]
        self.on: set[str] = {site.key for site in self.sites}
        self.chosen: dict[str, nn.Module] = {site.key: m for site, m in pairs}

    def forward(self, *args):
        swaps = {site.output: (site.input, self.chosen[site.key]) for site in self.sites if site.key in self.on}
        return _SwitchedRun(self.gm, swaps).run(*args)


@dataclass
class Search:
    """What the budget search did; `report.json`'s `budget`."""

    met: bool = False
    evaluations: int = 0
    seconds: float = 0.0
    probes: list[dict[str, Any]] = field(default_factory=list)  # per unit: sites, harm
    rolled_back: list[str] = field(default_factory=list)
    retried: list[str] = field(default_factory=list)  # rolled back, then re-applied as the rule built it
    relaxed: dict[str, int] = field(default_factory=dict)  # rolled back, then re-applied this many rungs up
    violations_before: list[str] = field(default_factory=list)
    violations_after: list[str] = field(default_factory=list)


def search(switched: Switched, measure: Callable[[nn.Module], tuple[list[str], dict[str, float]]],
           rung: Callable[[str, int], nn.Module | None] = lambda key, k: None) -> Search:
    """Turn sites off in `switched` until `measure` reports no violation, then give back what the
    bounds afford, each unit at the most compressive rung they afford. `measure(model)` returns
    (violations, slack): slack per bound, positive where it holds, in comparable units.
    `rung(key, k)` is the site's substitute k steps less compressive (k ≥ 1), or None where it has
    none (or none that passes its own checks)."""
    start, result = time.perf_counter(), Search()

    def run(on: set[str]) -> tuple[list[str], dict[str, float]]:
        switched.on = set(on)
        result.evaluations += 1
        return measure(switched)

    keys = [s.key for s in switched.sites]
    everything = set(keys)
    violations, slack = run(everything)
    result.violations_before = violations
    if not violations:
        result.met, result.violations_after = True, []
        result.seconds = round(time.perf_counter() - start, 3)
        return result
    units = _units(keys)
    failing = [b for b, v in slack.items() if v < 0]
    harms = []
    for unit in units:
        _, probe = run(everything - set(unit))
        harm = sum(_gain(probe.get(b), slack.get(b)) for b in failing)
        harms.append(harm)
        result.probes.append({"sites": unit, "harm": harm})
    order = sorted(range(len(units)), key=lambda i: -harms[i])
    on, removed = set(everything), []
    for i in order:
        on -= set(units[i])
        removed.append(i)
        violations, _ = run(on)
        if not violations:
            break
    if not violations:  # least harmful first: put back what the bounds can afford after all
        built = dict(switched.chosen)
        for last, i in enumerate(reversed(removed)):
            # the unit removed last: as built, the bounds were just seen failing; only its rungs can help
            for k in range(1 if last == 0 else 0, MAX_RUNGS + 1):
                trial = {key: built[key] if k == 0 else rung(key, k) for key in units[i]}
                trial = {key: m for key, m in trial.items() if m is not None}
                if not trial:
                    continue
                switched.chosen.update(trial)
                if not run(on | set(trial))[0]:
                    on |= set(trial)
                    if k == 0:
                        result.retried += list(trial)
                    else:
                        result.relaxed.update(dict.fromkeys(trial, k))
                    break
                switched.chosen.update({key: built[key] for key in trial})
    switched.on = on
    result.rolled_back = [k for k in keys if k not in on]
    result.met, result.violations_after = not violations, violations
    result.seconds = round(time.perf_counter() - start, 3)
    return result


def _gain(probe: float | None, base: float | None) -> float:
    if probe is None or base is None or math.isnan(probe) or math.isnan(base) or probe == base:
        return 0.0
    return probe - base


def _units(keys: list[str]) -> list[list[str]]:
    """Each site alone, or, above MAX_PROBES sites, MAX_PROBES runs of neighbours."""
    if len(keys) <= MAX_PROBES:
        return [[k] for k in keys]
    size = math.ceil(len(keys) / MAX_PROBES)
    return [keys[i:i + size] for i in range(0, len(keys), size)]


def slack(ruleset: rules_mod.RuleSet, e2e: dict[str, Any], before: dict[str, float] | None,
          after: dict[str, float] | None) -> dict[str, float]:
    """How far each end-to-end bound is from failing (positive: it holds), in units that rank harm
    (rules.MetricBound.slack, rules.Tolerance.slack)."""
    metrics = {f"metric:{b.name}": b.slack(before[b.name], (after or {}).get(b.name, math.nan))
               for b in ruleset.metrics}
    return metrics | ruleset.end_to_end.slack(e2e)
