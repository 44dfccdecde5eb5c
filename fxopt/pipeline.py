"""`optimize()`: the whole pipeline, one named stage per line.

    trace → match → build → layerwise → validate → gate → budget → substitute → collapse
          → cleanup → distill → freeze → fuse → export → end_to_end → evaluate

* trace:      model → GraphModule with shapes (symbolic_trace, else torch.export); PyTorch's
              attention modules opened up so their projections are sites (fxopt/attention.py)
* match:      every linear/conv site, and the rule (if any) that claims it; parameters that feed
              a matmul-like op outside any site are listed as not seen
* build:      the rule's substitute via `from_original`; guards may decline
* layerwise:  (optional) each substitute trained to reproduce its original layer's outputs on
              calibration data (fxopt/layerwise.py)
* validate:   each substitute against its original layer on identical inputs; a site that
              violates its rule's tolerance is rolled back (the original stays in the graph)
* gate:       each remaining site timed, original layer against substitute; a rule's
              `require_speedup` keeps the original where the substitute does not pay
* budget:     (with `end_to_end.enforce`) sites rolled back, most harmful first as measured on
              the user's evaluate() or the output tolerances, until every bound holds; then given
              back, where the bounds afford it, as built or less compressed (fxopt/budget.py)
* substitute: the accepted substitutes go into the graph (pass)
* collapse:   attention modules none of whose projections changed are one call again, with
              their fused fast path (pass)
* cleanup:    dead nodes and unused parameters go (pass)
* distill:    (optional) the substitutes trained inside the rewritten model against the
              original model's outputs
* freeze:     substitutes with a separate inference form switch to it (binary: latent weights →
              1-bit packed words, the same function as the training form in eval mode); the
              gate timed that form and end_to_end measures the frozen model
* fuse:       pointwise chains after a substitute (bias, activation, scaling, residual add, clamp)
              become its kernel's generated epilogue (pass; fxopt/passes/fuse.py)
* export:     the rewritten graph as a torch.export program: what is saved and what `load` returns
* end_to_end: the exported program against the user's original model
* evaluate:   (with the user's `evaluate()`, also run on the original first) the user's metrics of
              the exported program, against the original's and the rule file's bounds

Every stage's name and time go into the log and the report; every site leaves a record.
"""

from __future__ import annotations

import copy
import importlib
import logging
import math
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import fx, nn

from . import budget, distributed
from . import rules as rules_mod
from . import substitutes
from .budget import Evaluate, check_bounded, metric_changes, metric_violations, run_evaluate
from .errors import FxoptError, first_line
from .flops import dense_flops, param_count, storage_bytes, substitute_flops
from .gate import site_latency, verdict
from .graphs import summarize
from .layerwise import Layerwise, costliest_first, distill, record, train_sites
from .match import Decision, Site, choose_rules, find_sites, unseen
from .passes import cleanup, collapse, freeze, fuse, live_nodes, substitute
from .report import build_report
from .trace import batch_size, export_program, trace
from .save import inference_module
from .validate import end_to_end, eval_mode, site_errors

log = logging.getLogger("fxopt")


@dataclass
class SiteRecord:
    """What happened at one site; `report.json`'s `sites` entries are these, as dicts."""

    name: str
    key: str
    op: str
    form: str
    rule: str | None
    substitute: str | None
    status: str  # applied | rolled_back (tolerance) | gated (not faster enough) | over_budget (accuracy budget)
    #              | skipped | unused (dead code)
    reason: str | None
    params: dict[str, Any]
    module_before: str
    module_after: str
    params_before: int
    params_after: int
    flops_before: int
    flops_after: int
    reconstruction_error: float | None = None
    error: dict[str, float | None] | None = None
    tolerance: dict[str, float] = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)
    build_seconds: float = 0.0
    error_init: dict[str, float | None] | None = None  # before layer-wise training
    layerwise: dict[str, Any] | None = None  # steps, loss, loss_before, loss_after
    require_speedup: float | None = None
    latency: dict[str, Any] | None = None  # original_us, substitute_us, speedup, device
    bytes_before: int = 0  # parameters and buffers as stored
    bytes_after: int = 0
    epilogue: list[list[Any]] | None = None  # pointwise steps fused into the substitute's kernel

    def runs(self, site: Site, module: nn.Module) -> None:
        """The 'after' figures are those of this substitute at the site."""
        self.module_after = repr(module).replace("\n", " ")
        self.params_after = param_count(module)
        self.flops_after = substitute_flops(module, site.module, site.in_shape, site.out_shape)
        self.reconstruction_error = module.reconstruction_error

    def keep_original(self, status: str, reason: str) -> None:
        """The site keeps its original layer (rolled back or gated): the 'after' figures are the 'before' ones."""
        self.status, self.reason = status, reason
        self.module_after, self.params_after, self.flops_after = "unchanged", self.params_before, self.flops_before
        self.bytes_after = self.bytes_before


@dataclass
class Result:
    """The rewritten model, its exported program, and its report.

    `model` is the rewritten fx GraphModule (substitutes appear as modules, e.g. `KronLinear`);
    `program` is its torch.export program, which `save` writes and `fxopt.load` reads back.
    `substitutes` pairs each applied site (with its original layer, `site.module`) with its
    substitute.
    """

    model: fx.GraphModule
    program: torch.export.ExportedProgram | None  # None from `rewrite` (no export)
    report: dict[str, Any]
    substitutes: list[tuple[Site, nn.Module]] = field(default_factory=list)  # the applied ones

    def save(self, out_dir: str | Path) -> Path:
        from .save import save

        return save(self, out_dir)


class _Stages:
    def __init__(self):
        self.timings: list[dict[str, Any]] = []

    @contextmanager
    def __call__(self, name: str):
        log.info("stage %s", name)
        start = time.perf_counter()
        yield
        seconds = time.perf_counter() - start
        self.timings.append({"name": name, "seconds": round(seconds, 4)})
        log.info("stage %s done in %.2f s", name, seconds)


def optimize(model: nn.Module, example_inputs: tuple, rules: str | Path | rules_mod.RuleSet, *,
             calibration: Iterable[tuple] | None = None, source: str | None = None,
             layerwise: Layerwise | None = None, time_sites: bool = True, export_program: bool = True,
             freeze_substitutes: bool = True, evaluate: Evaluate | None = None,
             across_processes: bool = False) -> Result | None:
    """Rewrite `model` by `rules` (a path, a shipped name such as "kron", or a RuleSet).

    Validation runs on the example inputs and on every calibration batch given. `layerwise`
    trains the substitutes on the calibration batches (the example inputs when there are none)
    before validation. `time_sites` times every applied site (the gate); rules with
    `require_speedup` are timed whatever it says. Without `export_program` (the torch.compile
    backend) the export stage is skipped, `Result.program` is None and end_to_end checks the
    rewritten GraphModule itself. Without `freeze_substitutes` (training through the backend)
    the substitutes keep their training form and the freeze stage is skipped. `evaluate(model)
    -> {metric: number}` (the user's own, e.g. accuracy on held-out data) is run on the original
    model and on the result; the rule file may bound it, and with `end_to_end.enforce` sites are
    rolled back, most harmful first, until every bound holds (fxopt/budget.py). With
    `across_processes` (under torchrun, every process of the group calling it alike; what `fxopt
    optimize` does there), layer-wise training is split across the processes, distillation runs
    data parallel on the substitutes process 0 accepted, and every process but 0 returns None after
    them (fxopt/distributed.py).
    """
    ruleset = rules_mod.load(rules)
    layerwise = layerwise or Layerwise()
    calib = [tuple(b) for b in (calibration or [])]
    batches = [tuple(example_inputs)] + calib
    stage = _Stages()
    metrics_before = None
    if evaluate is not None:  # first: a broken evaluate() or an unknown bounded metric fails before any work
        with stage("evaluate_original"), eval_mode(model):
            metrics_before = run_evaluate(evaluate, model, "the original model")
    check_bounded(ruleset, metrics_before)
    with stage("trace"):
        traced = trace(model, tuple(example_inputs), source or type(model).__name__)
    with stage("match"):
        sites = find_sites(traced.gm)
        decisions = choose_rules(sites, ruleset)
        not_seen = unseen(traced.gm, sites, {u.path: u.reason for u in traced.unexpanded})
    with stage("build"):
        records, candidates = build(decisions, live_nodes(traced.gm.graph))
    if (layerwise.steps or layerwise.distill_steps) and candidates:
        with stage("imports"):  # torch.optim imports TorchDynamo at its first optimizer (≈0.6 s, once; export
            importlib.import_module("torch._dynamo")  # needs it too): kept out of the training stages' times
    if layerwise.steps:
        with stage("layerwise"):
            train_candidates(traced.gm, candidates, records, batches, calib or batches, layerwise, across_processes)
    helper = across_processes and distributed.world()[0] != 0  # process 0 alone validates, gates, writes
    if helper and not layerwise.distill_steps:
        return None  # the other processes' part ends here
    if across_processes:
        distributed.alone(True)
    search, accepted = None, []
    if not helper:
        with stage("validate"):
            accepted = validate_sites(traced.gm, candidates, records, batches)
        with stage("gate"):
            accepted = gate_sites(accepted, records, time_sites)
        if ruleset.enforce and accepted:
            with stage("budget"):
                ladder = Ladder(traced.gm, accepted, records, batches, calib or batches, layerwise)
                accepted, search = enforce_budget(model, traced.gm, accepted, records, ruleset, batches, evaluate,
                                                  metrics_before, ladder)
    if across_processes and layerwise.distill_steps:  # the others distil with it: they take its substitutes
        accepted = distributed.from_process_0(accepted, candidates)
        distributed.alone(False)
    reference = None
    if layerwise.distill_steps and layerwise.distill_sites and accepted:  # the original graph, for per-site targets
        with warnings.catch_warnings():  # torch's pytree warns about its own specs when they are copied
            warnings.simplefilter("ignore", FutureWarning)
            reference = copy.deepcopy(traced.gm)
    with stage("substitute"):
        before = summarize(traced.gm, {n.name: d.site.key for d in decisions for n in d.site.nodes})
        kept = {d.site.output.name: d.site.key for d in decisions if records[d.site.key].status != "applied"}
        gm, placed = substitute(traced.gm, accepted)
    with stage("collapse"):
        gm, attention = collapse(gm, traced.regions, {n for site, _ in accepted for n in site.nodes})
    with stage("cleanup"):
        gm, _ = cleanup(gm)
        placed, accepted = _still_placed(gm, placed, accepted, records)
    distilled = None
    if layerwise.distill_steps and accepted:
        with stage("distill"):
            if reference is not None:  # sites measured by recall (wta_hash) fill outputs with −inf: no target
                named = {n.name: n for n in reference.graph.nodes}
                reference = (reference, [(named[site.output.name], m) for site, m in accepted
                                         if m.validated_by != "recall"])
            distilled = distill(model, gm, [m for _, m in accepted], calib or batches, layerwise, reference,
                                across_processes)
    if helper:
        return None
    if across_processes:
        distributed.alone(True)
    params_after = param_count(gm)  # before freeze: a packed weight is still one weight
    if freeze_substitutes:
        with stage("freeze"):
            gm, frozen = freeze(gm, placed)
            accepted = [(site, frozen.get(site.key, module)) for site, module in accepted]
    for site, module in accepted:  # what is saved: packed bits for binary
        records[site.key].bytes_after = storage_bytes(module)
    with stage("fuse"):
        gm, fused = fuse(gm)
        site_of = {p["target"]: p["site"] for p in placed}
        for f in fused:
            records[site_of[f["target"]]].epilogue = f["steps"]
        after = summarize(gm, kept | _placed_nodes(gm, placed))
    program, exported = None, None
    if export_program:
        with stage("export"):
            program = export(gm, tuple(example_inputs))
            exported = {"batch": batch_size(program)}
    final = inference_module(program) if program is not None else gm
    with stage("end_to_end"):
        e2e = end_to_end(model, final, batches)
    metrics = None
    if evaluate is not None:
        with stage("evaluate"):
            metrics_after = run_evaluate(evaluate, final, "the rewritten model")
        metrics = {"values": metric_changes(metrics_before, metrics_after),
                   "violations": metric_violations(ruleset, metrics_before, metrics_after)}

    report = build_report(
        records=list(records.values()), e2e=e2e, ruleset=ruleset, traced=traced,
        params=(param_count(model), params_after), stages=stage.timings,
        storage=(storage_bytes(model), storage_bytes(gm)),
        batches=len(batches), source=source, graphs={"original": before, "rewritten": after},
        not_seen=not_seen, exported=exported, metrics=metrics, budget=asdict(search) if search else None,
        attention=attention + [{"module": u.path, "type": u.module_type, "expanded": False,
                                                   "reason": u.reason} for u in traced.unexpanded],
        training={"layerwise_steps": layerwise.steps, "lr": layerwise.lr, "loss": layerwise.loss,
                  "batches": len(calib or batches) if layerwise.steps or layerwise.distill_steps else 0,
                  "distill": distilled},
    )
    return Result(gm, program, report, accepted)


def rewrite(model: nn.Module, example_inputs: tuple, rules: str | Path | rules_mod.RuleSet, *,
            source: str | None = None, training: bool = False) -> Result:
    """The pipeline without export, for the torch.compile backend: sites are validated and
    rolled back as in `optimize`, only rules that ask for it (`require_speedup`) are timed, and
    `Result.model` is the rewritten GraphModule (in `training`, with substitutes in their training
    form: nothing frozen)."""
    return optimize(model, example_inputs, rules, source=source, time_sites=False, export_program=False,
                    freeze_substitutes=not training)


UNUSED = "its output is unused: nothing the model returns depends on it (cleanup removes it)"


def build(decisions: list[Decision], live: set[fx.Node] | None = None
          ) -> tuple[dict[str, SiteRecord], list[tuple[Site, nn.Module]]]:
    """A record per site, and a substitute (from `from_original`) for each site a rule claims
    whose output the model uses (`live`: the nodes the outputs depend on)."""
    records, candidates = {}, []
    for d in decisions:
        rec = _record(d)
        records[d.site.key] = rec
        if live is not None and d.site.output not in live:
            rec.status, rec.reason = "unused", UNUSED
            continue
        if d.rule is None:
            continue
        spec = substitutes.get(d.rule.substitute)
        start = time.perf_counter()
        try:
            module = spec.build(d.site.module, d.rule.param_dict).eval()
        except substitutes.Decline as exc:
            rec.status, rec.reason = "skipped", f"declined by {spec.name}: {exc}"
            continue
        rec.build_seconds = round(time.perf_counter() - start, 4)
        rec.runs(d.site, module)
        candidates.append((d.site, module))
    return records, candidates


def _placed_nodes(gm: fx.GraphModule, placed: list[dict]) -> dict[str, str]:
    """Node name → site key for the substitutes' call_module nodes in the rewritten graph."""
    by_target = {p["target"]: p["site"] for p in placed}
    return {n.name: by_target[n.target] for n in gm.graph.nodes if n.op == "call_module" and n.target in by_target}


def _still_placed(gm: fx.GraphModule, placed: list[dict], accepted: list[tuple[Site, nn.Module]],
                  records: dict[str, SiteRecord]) -> tuple[list[dict], list[tuple[Site, nn.Module]]]:
    """What cleanup left: a substitute whose call it removed as dead code is no longer placed
    (its site keeps the original's figures, with the reason), so later passes never ask for it."""
    called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    gone = {p["site"] for p in placed if p["target"] not in called}
    for key in gone:
        records[key].keep_original("unused", UNUSED)
    return ([p for p in placed if p["site"] not in gone],
            [(site, m) for site, m in accepted if site.key not in gone])


def train_candidates(gm: fx.GraphModule, candidates: list[tuple[Site, nn.Module]], records: dict[str, SiteRecord],
                     batches: list[tuple], train_batches: list[tuple], config: Layerwise,
                     across_processes: bool = False) -> None:
    """Layer-wise training; each record keeps its site's error before training (`error_init`).
    `train_batches` are the last of `batches` (the calibration batches, or all): one recording of
    the sites' values serves both. `across_processes`: each site goes to the first process free to
    train it, the costliest first (distributed.claims), and every process ends with all of them
    trained (fxopt/distributed.py)."""
    recorded = record(gm, candidates, batches)  # one run of the graph per batch, for the errors and the training
    train_recorded = recorded.tail(len(train_batches))
    rank, size = distributed.world() if across_processes else (0, 1)
    if size > 1 and candidates:  # one site at a time to whichever process is free, the costliest first
        recorded.share_across_processes()
        mine = {}  # site key → (this process, error before, training figures)
        order = costliest_first(candidates, train_recorded, config)
        for k in distributed.claims(len(order), "layerwise"):
            pair = candidates[order[k]]
            key = pair[0].key
            mine[key] = (rank, site_errors(gm, [pair], batches, recorded)[key],
                         train_sites(gm, [pair], train_batches, config, train_recorded).get(key))
        every = distributed.merged(mine)
        distributed.share_from_owners([m for _, m in candidates], [every[site.key][0] for site, _ in candidates])
        before = {key: v[1] for key, v in every.items()}
        trained = {key: v[2] for key, v in every.items() if v[2] is not None}
    else:
        before = site_errors(gm, candidates, batches, recorded)
        trained = train_sites(gm, candidates, train_batches, config, train_recorded)
    for site, _ in candidates:
        rec = records[site.key]
        rec.error_init = None if "failed" in before[site.key] else before[site.key]
        rec.layerwise = trained.get(site.key)


def gate_sites(accepted: list[tuple[Site, nn.Module]], records: dict[str, SiteRecord],
               time_all: bool) -> list[tuple[Site, nn.Module]]:
    """Time the accepted sites; keep the original where a rule's `require_speedup` is not met."""
    kept = []
    for site, module in accepted:
        rec = records[site.key]
        if rec.require_speedup is None and not time_all:
            kept.append((site, module))
            continue
        flops = rec.flops_before / rec.flops_after if rec.flops_after else None
        rec.latency = site_latency(site, substitutes.deployable(module), flop_ratio=flops)
        reason = verdict(rec.latency, rec.require_speedup)
        if reason:
            rec.keep_original("gated", reason)
        else:
            kept.append((site, module))
    return kept


def enforce_budget(model: nn.Module, gm: fx.GraphModule, accepted: list[tuple[Site, nn.Module]],
                   records: dict[str, SiteRecord], ruleset: rules_mod.RuleSet, batches: list[tuple],
                   evaluate: Evaluate | None, before: dict[str, float] | None, ladder: "Ladder"
                   ) -> tuple[list[tuple[Site, nn.Module]], budget.Search]:
    """The accuracy budget (fxopt/budget.py): the accepted sites less those rolled back, most
    harmful first, until every end-to-end bound holds (status `over_budget`), and those given back
    at a less compressive rung of their `ladder` (status `applied`, the reason says so)."""
    outputs = bool(ruleset.end_to_end.as_dict())
    metrics = bool(ruleset.metrics)  # evaluate() only where a bound reads it (check_bounded: then it exists)

    def measure(candidate: nn.Module) -> tuple[list[str], dict[str, float]]:
        e2e = end_to_end(model, candidate, batches) if outputs else {}
        after = run_evaluate(evaluate, candidate, "a candidate of the budget search") if metrics else None
        violations = ruleset.end_to_end.violations(e2e) if outputs else []
        if metrics:
            violations += metric_violations(ruleset, before, after)
        return violations, budget.slack(ruleset, e2e, before, after)

    switched = budget.Switched(gm, accepted)
    found = budget.search(switched, measure, ladder)
    harm = {k: p["harm"] for p in found.probes for k in p["sites"]}
    ranked = sorted(harm, key=lambda k: -harm[k])

    def probed(key: str) -> str:
        return (f"{ranked.index(key) + 1}. most harmful of {len(ranked)} probed; rolling it back alone moved the "
                f"failing bounds by {harm[key]:+.3g}× their allowance")

    held = ("the bounds held after it" if found.met else
            "the bounds do not hold even with every site rolled back: " + "; ".join(found.violations_after))
    for key in found.rolled_back:
        records[key].keep_original("over_budget", f"accuracy budget: rolled back ({probed(key)}); {held}")
    for key, k in found.relaxed.items():
        ladder.apply(key, k, f"accuracy budget: as the rule built it, it was rolled back ({probed(key)}); given back "
                             f"{k} step{'s' if k > 1 else ''} less compressed")
    return [(s, switched.chosen[s.key]) for s, _ in accepted if s.key not in found.rolled_back], found


@dataclass
class _Rung:
    params: dict[str, Any]
    module: nn.Module | None  # None: it failed the rule's tolerance (the next rung may not)
    size: int
    error: dict[str, float | None]
    layerwise: dict[str, Any] | None
    latency: dict[str, Any] | None


class Ladder:
    """Each accepted site's less compressive versions for the budget search (SubstituteSpec.relax,
    one step per rung): built when first asked for, trained layer-wise (when asked for) and held
    to the rule's tolerance and `require_speedup` as the rule's own substitute was. A rung that
    fails its tolerance is skipped; one that declines, holds no more parameters than the rung
    below, saves nothing against the original layer, or is gated ends the site's ladder."""

    def __init__(self, gm: fx.GraphModule, accepted: list[tuple[Site, nn.Module]], records: dict[str, SiteRecord],
                 batches: list[tuple], train_batches: list[tuple], layerwise: Layerwise):
        self.gm, self.records, self.batches, self.train_batches, self.layerwise = (
            gm, records, batches, train_batches, layerwise)
        self.sites = {site.key: site for site, _ in accepted}
        self.rungs: dict[str, list[_Rung]] = {}
        self.ended: set[str] = set()

    def __call__(self, key: str, k: int) -> nn.Module | None:
        rungs = self.rungs.setdefault(key, [])
        while len(rungs) < k and key not in self.ended:
            below = rungs[-1] if rungs else None
            rung = self._climb(key, below.params if below else self.records[key].params,
                               below.size if below else self.records[key].params_after)
            if rung is None:
                self.ended.add(key)
            else:
                rungs.append(rung)
        return rungs[k - 1].module if len(rungs) >= k else None

    def _climb(self, key: str, params: dict[str, Any], below: int) -> _Rung | None:
        rec, site = self.records[key], self.sites[key]
        spec = substitutes.get(rec.substitute)
        params = spec.relax(params) if spec.relax else None
        if params is None:
            return None
        try:
            module = spec.build(site.module, params).eval()
        except substitutes.Decline:
            return None
        size = param_count(module)
        flops = substitute_flops(module, site.module, site.in_shape, site.out_shape)
        if size <= below or size >= rec.params_before or flops >= rec.flops_before:
            return None
        trained = None
        if self.layerwise.steps:
            trained = train_sites(self.gm, [(site, module)], self.train_batches, self.layerwise).get(key)
        error = site_errors(self.gm, [(site, module)], self.batches)[key]
        failed = error.pop("failed", None)
        latency = None
        if not failed and (rec.latency is not None or rec.require_speedup is not None):
            latency = site_latency(site, substitutes.deployable(module), flop_ratio=rec.flops_before / flops)
            if verdict(latency, rec.require_speedup):
                return None
        usable = not failed and not _violations(error, rec.tolerance)
        return _Rung(params, module if usable else None, size, error, trained, latency)

    def apply(self, key: str, k: int, reason: str) -> None:
        """The site's record says it runs rung k."""
        rung, rec, site = self.rungs[key][k - 1], self.records[key], self.sites[key]
        changed = ", ".join(f"{name} {_short(rec.params[name])} → {_short(value)}"
                            for name, value in rung.params.items() if rec.params.get(name) != value)
        rec.reason = f"{reason} ({changed})"
        rec.params, rec.error, rec.layerwise = rung.params, rung.error, rung.layerwise or rec.layerwise
        rec.latency = rung.latency or rec.latency
        rec.runs(site, rung.module)


def _short(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _record(d: Decision) -> SiteRecord:
    site, rule = d.site, d.rule
    before = param_count(site.module)
    dense = dense_flops(site.module, site.in_shape, site.out_shape)
    stored = storage_bytes(site.module)
    return SiteRecord(
        name=site.name, key=site.key, op=site.op, form=site.form,
        rule=rule.name if rule else None, substitute=rule.substitute if rule else None,
        status="skipped", reason=d.reason, params=rule.param_dict if rule else {},
        module_before=repr(site.module).replace("\n", " ") if site.form == "module" else f"{site.form} {site.op}",
        module_after="unchanged", params_before=before, params_after=before,
        flops_before=dense, flops_after=dense,
        bytes_before=stored, bytes_after=stored,
        tolerance=rule.tolerance.as_dict() if rule else {},
        require_speedup=rule.require_speedup if rule else None,
    )


def validate_sites(gm: fx.GraphModule, candidates: list[tuple[Site, nn.Module]],
                   records: dict[str, SiteRecord], batches: list[tuple]) -> list[tuple[Site, nn.Module]]:
    """Measure each candidate against its original layer; keep those within their rule's tolerance."""
    errors = site_errors(gm, candidates, batches)
    accepted = []
    for site, module in candidates:
        rec = records[site.key]
        rec.error = errors[site.key]
        failed = rec.error.pop("failed", None)
        violations = [failed] if failed else _violations(rec.error, rec.tolerance)
        if violations:
            rec.violations = violations
            rec.keep_original("rolled_back", failed or "tolerance violated: " + "; ".join(violations))
        else:
            rec.status = "applied"
            accepted.append((site, module))
    return accepted


def _violations(error: dict[str, float | None], tolerance: dict[str, float]) -> list[str]:
    if any(isinstance(v, float) and math.isnan(v) for v in error.values()):
        return ["substitute produced non-finite values"]
    return rules_mod.Tolerance(**tolerance).violations(error)


def export(gm: fx.GraphModule, example_inputs: tuple) -> torch.export.ExportedProgram:
    """The rewritten graph as a torch.export program, batch dimension dynamic where it can be."""
    try:
        return export_program(gm, example_inputs)
    except Exception as exc:
        raise FxoptError(f"cannot export the rewritten model: {first_line(exc)}") from None


__all__ = ["optimize", "rewrite", "Result", "SiteRecord"]
