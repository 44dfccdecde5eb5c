"""Reports: format the pipeline's records, nothing else (docs/architecture.md, principle 10).

`report.json` keys are stable (schema 1): `sites` (one entry per linear/conv site), `end_to_end`
(error keys, `top1_agreement` for classifier outputs, whole-model params and site FLOPs,
the end-to-end tolerance and its violations), `totals`, `stages`, `trace`, `rules`, `model`.
Keys added later, without changing the ones above: `training` (layer-wise settings and the
distillation's losses), per site `error_init`, `layerwise`, `require_speedup`, `latency`, the
status `gated` and `totals.gated`, the status `unused` (a site whose output nothing the model
returns depends on) and `totals.unused`, `curve` in each site's `layerwise` and in `training.distill` (the loss at up to
50 points, each the mean of consecutive steps), `totals.slower` (applied sites measured slower than the
original layer), `graphs` (`original` and `rewritten`: nodes and edges, see fxopt/graphs.py),
`not_seen` (parameters that feed a matmul-like op outside every site: `param`, `node`, `op`,
`reason`), `attention` (each attention module call: `module`, `type`, `expanded`: whether the
rewritten model runs it opened up, because one of its projections changed, or as the module
itself; `reason` where fxopt could not open it), `export.batch` (`dynamic`: whether the saved program takes
any batch size; `size` where it is fixed), `end_to_end.outputs` (models with several outputs: each one's
`name`, as torch's pytree writes its path, and metrics), `end_to_end.degenerate_reference` (and in any
error dict: why the reference output anchors no relative metric), `end_to_end.metrics` (the model file's
`evaluate()`: `{name: {before, after, change}}`) and `end_to_end.metric_bounds`, `budget` (the accuracy-budget
search, fxopt/budget.py: `met`, `evaluations`, `seconds`, `probes`, `rolled_back`, `retried`, `violations_before`,
`violations_after`; null when not enforced), the status `over_budget` and `totals.over_budget`, per site
`latency.retimed` and `latency.unreliable` (why the timing could not be trusted after re-timing).
"""

from __future__ import annotations

import math
import platform
from dataclasses import asdict
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

REPORT_SCHEMA = 1
ERROR_KEYS = ("max_abs", "rel_l2", "sqnr_db", "cosine")


STATUSES = ("applied", "rolled_back", "gated", "over_budget", "skipped", "unused")


def build_report(*, records, e2e, ruleset, traced, params, stages, batches, source, storage=(0, 0),
                 training: dict[str, Any] | None = None, graphs: dict[str, Any] | None = None,
                 not_seen: list[dict[str, str]] | None = None,
                 attention: list[dict[str, Any]] | None = None,
                 exported: dict[str, Any] | None = None, metrics: dict[str, Any] | None = None,
                 budget: dict[str, Any] | None = None) -> dict[str, Any]:
    from . import __version__

    sites = [asdict(r) for r in records]
    counts = {s: sum(r.status == s for r in records) for s in STATUSES}
    slower = [r.key for r in records if r.status == "applied" and r.latency and r.latency["speedup"] < 1]
    flops_before = sum(r.flops_before for r in records)
    flops_after = sum(r.flops_after for r in records)
    violations = ruleset.end_to_end.violations(e2e)
    if any(isinstance(v, float) and math.isnan(v) for v in e2e.values()):
        violations.append("rewritten model produced non-finite values")
    violations += (metrics or {}).get("violations", [])
    end_to_end = {
        **{k: e2e.get(k) for k in ERROR_KEYS},
        "top1_agreement": e2e.get("top1_agreement"),
        "degenerate_reference": e2e.get("degenerate_reference"),
        "outputs": e2e.get("outputs", []),
        "metrics": (metrics or {}).get("values", {}),
        "metric_bounds": {b.name: {("max_drop" if b.higher_is_better else "max_rise"): b.limit}
                          for b in ruleset.metrics},
        "params_before": params[0], "params_after": params[1],
        "bytes_before": storage[0], "bytes_after": storage[1],
        "flops_before": flops_before, "flops_after": flops_after,
        "tolerance": ruleset.end_to_end.as_dict(), "violations": violations,
    }
    return {
        "schema": REPORT_SCHEMA,
        "fxopt_version": __version__,
        "model": source,
        "rules": ruleset.source,
        "trace": {"method": traced.method, "fallback_reason": traced.fallback_reason},
        "validation_batches": batches,
        "training": training or {},
        "stages": stages,
        "sites": sites,
        "end_to_end": end_to_end,
        "totals": {"sites": len(records), **counts, "slower": slower,
                   "site_params_before": sum(r.params_before for r in records),
                   "site_params_after": sum(r.params_after for r in records),
                   "flops_before": flops_before, "flops_after": flops_after},
        "graphs": graphs or {},
        "not_seen": not_seen or [],
        "attention": attention or [],
        "export": exported or {},
        "budget": budget,
        "environment": {"torch": torch.__version__, "python": platform.python_version(),
                        "machine": platform.machine(), "threads": torch.get_num_threads()},
    }


def fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        return f"{value:.{digits}g}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def change(before: int, after: int, less: str, more: str) -> str:
    """'7.6× smaller', '2.0× larger' or 'unchanged', read from before/after counts."""
    if not after or not before:
        return "—"
    if before == after:
        return "unchanged"
    return f"{before / after:.1f}× {less}" if after < before else f"{after / before:.1f}× {more}"


def markdown(report: dict[str, Any]) -> str:
    e, t = report["end_to_end"], report["totals"]
    lines = [
        f"# fxopt report: {report['model']}",
        "",
        f"Rules: `{report['rules']}` · traced with `{report['trace']['method']}`"
        + (f" (symbolic_trace failed: {report['trace']['fallback_reason']})" if report["trace"]["fallback_reason"] else "")
        + f" · validated on {report['validation_batches']} batch(es) · fxopt {report['fxopt_version']}, "
          f"torch {report['environment']['torch']}",
        "",
        f"Sites: {t['sites']} · applied {t['applied']} · rolled back {t['rolled_back']} · gated {t['gated']} "
        f"· skipped {t['skipped']}" + (f" · unused {t['unused']}" if t.get("unused") else "")
        + (f" · over budget {t['over_budget']}" if t.get("over_budget") else ""),
        *_training_lines(report),
        *(["", line] if (line := budget_line(report)) else []),
        *_slower_lines(t),
        "",
        "## End to end",
        "",
        *_metric_table(e),
        "| metric | value |",
        "|---|---|",
        *(f"| {k} | {fmt(e[k])} |" for k in (*ERROR_KEYS, "top1_agreement")),
        f"| params | {fmt(e['params_before'])} → {fmt(e['params_after'])} ({change(e['params_before'], e['params_after'], 'smaller', 'larger')}) |",
        f"| weights and buffers (bytes) | {fmt(e.get('bytes_before'))} → {fmt(e.get('bytes_after'))} "
        f"({change(e.get('bytes_before'), e.get('bytes_after'), 'smaller', 'larger')}) |",
        f"| linear/conv FLOPs | {fmt(e['flops_before'])} → {fmt(e['flops_after'])} ({change(e['flops_before'], e['flops_after'], 'fewer', 'more')}) |",
        *([f"| reference | {e['degenerate_reference']}: relative metrics not meaningful |"]
          if e.get("degenerate_reference") else []),
        f"| batch size of the saved model | {_batch_text(report)} |",
        f"| tolerance | {e['tolerance'] or '—'} |",
        f"| violations | {'; '.join(e['violations']) or 'none'} |",
        *_output_table(e),
        "",
        "## Sites",
        "",
        "Errors are the substitute's output against the original layer's on identical inputs; "
        "`sqnr dB (init)` is before layer-wise training. Latency: eager, original layer → substitute, "
        "on the site's input shape.",
        "",
        "| site | op | rule | substitute | status | params | FLOPs | weight error | sqnr dB (init) | sqnr dB "
        "| rel L2 | cosine | max abs | recall@1 / @5 | latency µs | speed-up | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in report["sites"]:
        err, init, lat = s["error"] or {}, s.get("error_init") or {}, s.get("latency")
        latency = f"{lat['original_us']:.1f} → {lat['substitute_us']:.1f}" if lat else "—"
        speed = (f"{lat['speedup']:.2f}×" + (f" (unreliable: {lat['unreliable']})" if lat.get("unreliable") else "")
                 if lat else "—")
        lines.append(
            f"| `{s['key']}` | {s['op']} ({s['form']}) | {s['rule'] or '—'} | {s['substitute'] or '—'} | {s['status']} "
            f"| {fmt(s['params_before'])} → {fmt(s['params_after'])} | {fmt(s['flops_before'])} → {fmt(s['flops_after'])} "
            f"| {fmt(s['reconstruction_error'])} | {fmt(init.get('sqnr_db'))} | {fmt(err.get('sqnr_db'))} "
            f"| {fmt(err.get('rel_l2'))} | {fmt(err.get('cosine'))} | {fmt(err.get('max_abs'))} | {_recall(err)} "
            f"| {latency} | {speed} "
            f"| {(s['reason'] or '').replace('|', '/')} |")
    lines += _layerwise_lines(report) + _attention_lines(report) + _not_seen_lines(report)
    lines += ["", "## Stages", "", "| stage | seconds |", "|---|---|",
              *(f"| {s['name']} | {s['seconds']:.3f} |" for s in report["stages"]), ""]
    return "\n".join(lines)


def metric_lines(e: dict[str, Any]) -> list[str]:
    """The user's metrics (evaluate()), one line each: 'accuracy 0.9511 → 0.9489 (-0.0022; max_drop 0.01)'."""
    bounds = e.get("metric_bounds") or {}
    lines = []
    for name, m in (e.get("metrics") or {}).items():
        bound = "".join(f"; {k} {v:g}" for k, v in bounds.get(name, {}).items())
        lines.append(f"{name} {fmt(m['before'])} → {fmt(m['after'])} ({m['change']:+.4g}{bound})")
    return lines


def _metric_table(e: dict[str, Any]) -> list[str]:
    lines = metric_lines(e)
    if not lines:
        return []
    return ["Your metrics (`evaluate()`), original → saved model:", "", *(f"- {line}" for line in lines), ""]


def budget_line(report: dict[str, Any]) -> str | None:
    """What the accuracy-budget search did, in a sentence (None when it was not asked for)."""
    b = report.get("budget")
    if not b:
        return None
    if not b["violations_before"]:
        return f"Accuracy budget: every bound held with all sites applied (1 evaluation, {b['seconds']:.1f} s)."
    outcome = "every bound holds" if b["met"] else "the bounds still fail: " + "; ".join(b["violations_after"])
    removed = len(b["rolled_back"]) + len(b["retried"]) + len(b["relaxed"])
    relaxed = [f"{k} ({n} step{'s' if n > 1 else ''})" for k, n in b["relaxed"].items()]
    return (f"Accuracy budget: {removed} site(s) rolled back, most harmful first; "
            f"given back as built: {', '.join(b['retried']) or 'none'}; given back less compressed: "
            f"{', '.join(relaxed) or 'none'}; rolled back for good: {', '.join(b['rolled_back']) or 'none'}; "
            f"{outcome}. {b['evaluations']} evaluations, {b['seconds']:.1f} s. Before: "
            + "; ".join(b["violations_before"]) + ".")


def output_line(o: dict[str, Any]) -> str:
    """One output's agreement in a line of text (its relative metrics only when they mean something)."""
    if o.get("degenerate_reference") and o.get("rel_l2") is None:
        return (f"reference {o['degenerate_reference']}: relative metrics not meaningful · "
                f"max abs {fmt(o.get('max_abs'), 3)}")
    top1 = f" · top-1 agreement {fmt(o['top1_agreement'], 3)}" if o.get("top1_agreement") is not None else ""
    return (f"rel L2 {fmt(o.get('rel_l2'), 3)} · sqnr {fmt(o.get('sqnr_db'), 3)} dB · cosine {fmt(o.get('cosine'), 5)} · "
            f"max abs {fmt(o.get('max_abs'), 3)}{top1}")


def _output_table(e: dict[str, Any]) -> list[str]:
    outputs = e.get("outputs") or []
    if not outputs:
        return []
    return ["", "Each output of the model:", "", "| output | agreement with the original |", "|---|---|",
            *(f"| `{o['name']}` | {output_line(o).replace('|', '/')} |" for o in outputs)]


def _batch_text(report: dict[str, Any]) -> str:
    fixed = fixed_batch(report)
    if fixed is not None:
        return f"{fixed} only (the model fixes it)"
    return "any" if ((report.get("export") or {}).get("batch") or {}).get("dynamic") else "—"


def _attention_lines(report: dict[str, Any]) -> list[str]:
    calls = report.get("attention") or []
    if not calls:
        return []
    lines = ["", "## Attention modules", "",
             "Opened up so that their projections are sites; those with no rewritten projection run as "
             "the module itself again (PyTorch's fused eval fast path included).", "",
             "| module | type | runs as |", "|---|---|---|"]
    for a in calls:
        runs = ("opened up (a projection was rewritten)" if a["expanded"] else
                f"the module, not opened: {a['reason']}" if a.get("reason") else "the module")
        lines.append(f"| `{a['module']}` | {a['type']} | {runs.replace('|', '/')} |")
    return lines


def _not_seen_lines(report: dict[str, Any]) -> list[str]:
    missed = report.get("not_seen") or []
    if not missed:
        return []
    return ["", "## Not seen", "",
            "Parameters that feed a matmul-like op outside every site: no rule can reach them.", "",
            "| parameter | op | reason |", "|---|---|---|",
            *(f"| `{m['param']}` | {m['op']} | {m['reason'].replace('|', '/')} |" for m in missed)]


def _recall(err: dict[str, Any]) -> str:
    """Recall of the dense top-1 / top-5 (sites of substitutes that compute only some outputs)."""
    if "recall_at_1" not in err:
        return "—"
    return f"{fmt(err['recall_at_1'], 3)} / {fmt(err['recall_at_5'], 3)}"


def _training_lines(report: dict[str, Any]) -> list[str]:
    t = report.get("training") or {}
    lines = []
    if t.get("layerwise_steps"):
        lines.append(f"Layer-wise training: {t['layerwise_steps']} steps per site, loss {t['loss']}, lr {t['lr']:g}, "
                     f"on {t['batches']} batch(es).")
    if t.get("distill"):
        d = t["distill"]
        lines.append(f"Distillation: none: {d['reason']}." if d.get("reason") else
                     f"Distillation: {d['steps']} steps, output loss {fmt(d['loss_before'])} → {fmt(d['loss_after'])}"
                     + (f"; curve {sample_curve(d['curve'])}" if d.get("curve") else "") + ".")
    return ["", *lines] if lines else []


def sample_curve(curve: list[float], points: int = 8) -> str:
    """A loss curve in a line of text: `points` values spread over it, first and last included."""
    if len(curve) <= points:
        picked = curve
    else:
        picked = [curve[round(i * (len(curve) - 1) / (points - 1))] for i in range(points)]
    return " → ".join(fmt(v, 3) for v in picked)


def _layerwise_lines(report: dict[str, Any]) -> list[str]:
    trained = [s for s in report["sites"] if (s.get("layerwise") or {}).get("curve")]
    if not trained:
        return []
    return ["", "## Layer-wise training", "", "| site | loss | loss curve |", "|---|---|---|",
            *(f"| `{s['key']}` | {s['layerwise']['loss']} | {sample_curve(s['layerwise']['curve'])} |" for s in trained)]


def _slower_lines(totals: dict[str, Any]) -> list[str]:
    if not totals.get("slower"):
        return []
    return ["", f"**Slower:** {len(totals['slower'])} applied site(s) run slower than the original layer "
                f"(eager, this machine): {', '.join(totals['slower'])}. Add `require_speedup` to their rule "
                "to keep the original layers there."]


STATUS_STYLE = {"applied": "green", "rolled_back": "yellow", "gated": "yellow", "over_budget": "yellow", "skipped": "dim",
                "unused": "dim"}


def print_summary(report: dict[str, Any], console: Console | None = None, stages: bool = False) -> None:
    """A short terminal summary: one row per site, the notes of sites left unchanged, then the
    end-to-end line; with `stages`, each stage's time first."""
    console = console or Console()
    if stages:
        console.print("stages: " + " · ".join(f"{s['name']} {s['seconds']:.2f} s" for s in report["stages"]),
                      markup=False, highlight=False)
    table = Table(title=f"fxopt · {report['model']} · {report['rules']}", title_justify="left")
    for col in ("site", "substitute: status", "params", "sqnr dB", "speed-up"):
        table.add_column(col, no_wrap=col != "site", overflow="fold")
    notes = []
    for s in report["sites"]:
        err, init, lat = s["error"] or {}, s.get("error_init") or {}, s.get("latency")
        if "recall_at_1" in err:  # a substitute checked by recall, not SQNR
            sqnr = f"recall@1/@5 {_recall(err)}"
        else:
            sqnr = fmt(err.get("sqnr_db"), 3)
            if init:
                sqnr = f"{fmt(init.get('sqnr_db'), 3)} → {sqnr}"
        status = f"[{STATUS_STYLE[s['status']]}]{s['status']}[/]"
        table.add_row(s["key"], f"{s['substitute']}: {status}" if s["substitute"] else status,
                      f"{fmt(s['params_before'])} → {fmt(s['params_after'])}", sqnr,
                      f"{lat['speedup']:.2f}×" + ("?" if lat.get("unreliable") else "") if lat else "—")
        if s["reason"]:
            notes.append(f"  {s['key']}: {s['reason']}")
        if lat and lat.get("unreliable"):
            notes.append(f"  {s['key']}: ? timing unreliable: {lat['unreliable']}")
    console.print(table)
    for note in notes:
        console.print(note, markup=False, highlight=False)
    missed = report.get("not_seen") or []
    if missed:
        shown = ", ".join(f"{m['param']} ({m['op']})" for m in missed[:6]) + (" …" if len(missed) > 6 else "")
        console.print(f"[yellow]not seen: {len(missed)} parameter(s) feed a matmul-like op outside every site: "
                      f"{shown}[/] (report.md lists why)", highlight=False)
    slower = report["totals"].get("slower")
    if slower:
        console.print(f"[yellow]slower: {len(slower)} applied site(s) run slower than the original layer "
                      f"(eager, this machine): {', '.join(slower)}[/]")
    e = report["end_to_end"]
    top1 = f" · top-1 agreement {e['top1_agreement']:.3f}" if e["top1_agreement"] is not None else ""
    for o in e.get("outputs") or []:
        console.print(f"  output {o['name']}: {output_line(o)}", markup=False, highlight=False)
    if e.get("degenerate_reference"):
        console.print(f"[yellow]the original model's output is {e['degenerate_reference']}: relative metrics "
                      "(sqnr, cosine, top-1) mean nothing on these inputs[/]")
    console.print(f"end to end: sqnr {fmt(e['sqnr_db'], 3)} dB · cosine {fmt(e['cosine'], 5)} · "
                  f"max abs {fmt(e['max_abs'], 3)}{top1} · params {change(e['params_before'], e['params_after'], 'smaller', 'larger')}"
                  f" · bytes {change(e.get('bytes_before'), e.get('bytes_after'), 'smaller', 'larger')}"
                  f" · linear/conv FLOPs {change(e['flops_before'], e['flops_after'], 'fewer', 'more')}")
    for line in metric_lines(e):
        console.print(f"your metric: {line}", markup=False, highlight=False)
    if line := budget_line(report):
        console.print(line, markup=False, highlight=False)
    for v in e["violations"]:
        console.print(f"[red]end-to-end bound violated: {v}[/]")
    fixed = fixed_batch(report)
    if fixed is not None:
        console.print(f"[yellow]the saved model takes batch size {fixed} only: the model fixes its batch "
                      "dimension (it does not run on its example inputs repeated along it)[/]")


def fixed_batch(report: dict[str, Any]) -> int | None:
    """The batch size the saved program is fixed at, or None when it takes any (or has none)."""
    batch = (report.get("export") or {}).get("batch") or {}
    return batch.get("size") if batch.get("dynamic") is False else None


def print_bench(timings: dict[str, Any], console: Console | None = None) -> None:
    """The timings of `fxopt bench` as one table: end to end first, then each rewritten site."""
    console = console or Console()
    compiled = timings["compiled"]
    env = timings["environment"]
    table = Table(title=f"fxopt bench · {timings['model']} · {timings['rules']} · {env['device']}, "
                        f"{env['threads']} threads, torch {env['torch']}", title_justify="left")
    # µs per call; +c: under torch.compile; speed-ups are original ÷ fxopt, "best" the faster of each side
    cols = ["", "orig µs", "fxopt µs"] + (["orig+c µs", "fxopt+c µs"] if compiled else [])
    cols += ["eager"] + (["compiled", "best"] if compiled else [])
    for col in cols:
        table.add_column(col, justify="right" if col else "left")
    rows = [("end to end", timings["end_to_end"])] + [(s["name"], s) for s in timings["sites"]]
    for name, row in rows:
        us, sp = row["us"], row["speedup"]
        cells = [f"{us['original']:.1f}", f"{us['fxopt']:.1f}"]
        if compiled:
            cells += [f"{us['original+compile']:.1f}", f"{us['fxopt+compile']:.1f}"]
        mark = "?" if row.get("unreliable") else ""
        cells += [f"{sp['eager']:.2f}×{mark}"] + ([f"{sp['compiled']:.2f}×{mark}", f"[bold]{sp['best']:.2f}×{mark}[/]"]
                                                  if compiled else [])
        table.add_row(name, *cells)
    console.print(table)
    for name, row in rows:
        if row.get("unreliable"):
            console.print(f"[yellow]?: {name}: timings unreliable: {row['unreliable']}[/]", highlight=False)
    acc = timings["accuracy"]
    top1 = f" · top-1 agreement {acc['top1_agreement']:.3f}" if acc["top1_agreement"] is not None else ""
    mine = "".join(f" · {name} {fmt(m['before'])} → {fmt(m['after'])}" for name, m in (timings.get("metrics") or {}).items())
    console.print(f"for: end-to-end cosine {fmt(acc['cosine'], 4)}{top1}{mine} (see `fxopt optimize` for the full report)")
