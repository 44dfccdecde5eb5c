"""`report.html`: one self-contained page (inline SVG and CSS, a few lines of script, nothing
fetched at view time) that shows what fxopt did.

* the original and the rewritten graph side by side; rewritten sites highlighted and linked to
  their rows in the site table; unchanged runs of nodes collapsed;
* the site table (rule, substitute, status, params, FLOPs, per-site error before and after
  layer-wise training, measured latency, reason);
* plots: per-site error against compression, where the time goes per site, before and after
  (from the gate's measurements), and, when there was training, the loss curves of layer-wise
  training (per site) and distillation.

`diff_page(a, b)` is the same page for two saved results (`fxopt diff A B`): graph A and graph B,
nodes without a counterpart highlighted, and the sites of both side by side.
"""

from __future__ import annotations

import html
import math
from typing import Any

import networkx as nx

from . import graphs
from .report import ERROR_KEYS, budget_line, change, fmt, metric_lines, output_line

CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#111827}
h1{font-size:1.4em} h2{font-size:1.15em;margin-top:1.6em}
table{border-collapse:collapse;font-size:12px} td,th{border:1px solid #d1d5db;padding:3px 6px;text-align:left}
tr:target,tr.hl{background:#fef3c7} .applied{color:#15803d} .rolled_back,.gated,.over_budget{color:#b45309} .skipped,.unused{color:#6b7280}
.graphs{display:flex;gap:12px} .pane{flex:1;overflow:auto;max-height:80vh;border:1px solid #d1d5db}
.pane h3{position:sticky;top:0;background:#f9fafb;margin:0;padding:4px 8px;font-size:13px}
.plots{display:flex;gap:24px;flex-wrap:wrap} .legend span{display:inline-block;padding:1px 6px;margin-right:6px;border:1px solid #374151}
g.node.hl rect,g.node.hl path,g.node.hl polygon{stroke:#2563eb;stroke-width:3}
"""

SCRIPT = """
document.querySelectorAll('tr[data-site]').forEach(function (row) {
  row.addEventListener('click', function () {
    var key = row.getAttribute('data-site');
    document.querySelectorAll('.hl').forEach(function (e) { e.classList.remove('hl'); });
    row.classList.add('hl');
    document.querySelectorAll('[*|href="#site-' + key + '"]').forEach(function (link) {
      var node = link.closest('g.node') || link.querySelector('g.node');  // graphviz nests the link inside
      if (node) { node.classList.add('hl'); }
    });
  });
});
document.body.setAttribute('data-ready', document.querySelectorAll('svg.graph').length + ' graphs');
"""


def _legend() -> str:
    items = [("site", "rewritten site (links to its row)"), ("changed", "changed, or no counterpart in the other graph"),
             ("site_kept", "site left unchanged"), ("collapsed", "collapsed unchanged run"), ("io", "input / output")]
    return '<p class="legend">' + "".join(
        f'<span style="background:{graphs.COLORS[k]}">{html.escape(text)}</span>' for k, text in items) + "</p>"


def _with_status(summary: dict, sites: list[dict]) -> nx.DiGraph:
    g = graphs.to_nx(summary)
    status = {s["key"]: s["status"] for s in sites}
    for n in g:
        if g.nodes[n].get("site"):
            g.nodes[n]["status"] = status.get(g.nodes[n]["site"], "applied")
    return g


def _graph_panes(left: tuple[str, dict, list], right: tuple[str, dict, list]) -> str:
    ga, gb = _with_status(left[1], left[2]), _with_status(right[1], right[2])
    pairs = graphs.match(ga, gb)
    matched_b = set(pairs.values())
    relabelled = {n for n, m in pairs.items() if ga.nodes[n]["label"] != gb.nodes[m]["label"]}
    changed_a = {n for n in ga if n not in pairs} | relabelled
    changed_b = {n for n in gb if n not in matched_b} | {pairs[n] for n in relabelled}
    # applied sites and changed nodes stay visible; everything else may collapse into runs
    keep_a = changed_a | {n for n in ga if ga.nodes[n].get("site") and ga.nodes[n]["status"] == "applied"}
    keep_b = changed_b | {n for n in gb if gb.nodes[n].get("site") and gb.nodes[n]["status"] == "applied"}
    panes = []
    for (title, _, _), g, changed, keep, gid in ((left, ga, changed_a, keep_a, "graph-a"),
                                               (right, gb, changed_b, keep_b, "graph-b")):
        small = graphs.collapse(g, keep)
        panes.append(f'<div class="pane"><h3>{html.escape(title)} · {g.number_of_nodes()} nodes</h3>'
                     f'{graphs.svg(small, gid, changed)}</div>')
    return f'<div class="graphs">{"".join(panes)}</div>'


def _scatter(sites: list[dict]) -> str:
    """Per-site error (SQNR dB) against compression (params before / after), applied sites."""
    pts = [(s["params_before"] / s["params_after"], s["error"]["sqnr_db"], s["key"]) for s in sites
           if s["status"] == "applied" and s.get("error") and s["error"].get("sqnr_db") is not None
           and s["params_after"]]
    w, h, pad = 440, 220, 36
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="plot" id="plot-error" width="{w}" height="{h}">',
             '<text x="4" y="14" font-size="12">per-site SQNR (dB) against compression (params ÷, log scale)</text>']
    if not pts:
        parts.append(f'<text x="{pad}" y="{h / 2}" font-size="12">no applied site with a finite error</text></svg>')
        return "".join(parts)
    xs = [math.log10(max(p[0], 1e-9)) for p in pts]
    ys = [p[1] for p in pts]
    x0, x1 = min(xs + [0]), max(xs + [1])
    y0, y1 = min(ys + [0]), max(ys + [1])
    sx = lambda x: pad + (x - x0) / (x1 - x0 or 1) * (w - 2 * pad)  # noqa: E731
    sy = lambda y: h - pad + (y - y0) / (y1 - y0 or 1) * (2 * pad - h)  # noqa: E731
    parts.append(f'<line x1="{pad}" y1="{h - pad}" x2="{w - pad}" y2="{h - pad}" stroke="#111"/>'
                 f'<line x1="{pad}" y1="{h - pad}" x2="{pad}" y2="{pad}" stroke="#111"/>'
                 f'<text x="{pad}" y="{h - 8}" font-size="10">{10 ** x0:.3g}×</text>'
                 f'<text x="{w - pad - 30}" y="{h - 8}" font-size="10">{10 ** x1:.3g}×</text>'
                 f'<text x="2" y="{h - pad}" font-size="10">{y0:.3g}</text><text x="2" y="{pad + 4}" font-size="10">{y1:.3g}</text>')
    for (ratio, sqnr, key), x in zip(pts, xs):
        parts.append(f'<a href="#site-{html.escape(key)}"><circle cx="{sx(x):.1f}" cy="{sy(sqnr):.1f}" r="4" '
                     f'fill="#f59e0b" stroke="#111"><title>{html.escape(key)}: {ratio:.3g}× fewer params, '
                     f'{sqnr:.3g} dB</title></circle></a>')
    parts.append("</svg>")
    return "".join(parts)


def _time_bars(sites: list[dict]) -> str:
    """Measured latency per timed site: the original layer against its substitute."""
    rows = [(s["key"], s["latency"]["original_us"], s["latency"]["substitute_us"]) for s in sites if s.get("latency")]
    w, row_h, pad, label_w = 500, 18, 20, 110
    h = pad * 2 + max(len(rows), 1) * row_h * 2 + 10
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="plot" id="plot-time" width="{w}" height="{h}">',
             '<text x="4" y="14" font-size="12">where the time goes: µs per timed site, original layer (grey), '
             'substitute (orange)</text>']
    if not rows:
        parts.append(f'<text x="4" y="{pad + 20}" font-size="12">no site was timed (--no-time-sites)</text></svg>')
        return "".join(parts)
    top = max(max(a, b) for _, a, b in rows) or 1
    for i, (key, before, after) in enumerate(rows):
        y = pad + 4 + i * row_h * 2
        for j, (value, color) in enumerate(((before, "#9ca3af"), (after, "#f59e0b"))):
            bw = value / top * (w - label_w - 60)
            parts.append(f'<rect x="{label_w}" y="{y + j * (row_h - 4):.0f}" width="{bw:.1f}" height="{row_h - 6}" '
                         f'fill="{color}"/><text x="{label_w + bw + 4:.0f}" y="{y + j * (row_h - 4) + 10:.0f}" '
                         f'font-size="10">{value:.1f}</text>')
        parts.append(f'<text x="4" y="{y + 14:.0f}" font-size="11">{html.escape(key[:16])}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _loss_curves(report: dict[str, Any]) -> str:
    """Training loss against steps (log scale): each site's layer-wise curve, and distillation."""
    curves = [(s["key"], s["layerwise"]["curve"], "#9ca3af") for s in report["sites"]
              if (s.get("layerwise") or {}).get("curve")]
    distill = (report.get("training") or {}).get("distill") or {}
    if distill.get("curve"):
        curves.append(("distillation", distill["curve"], "#f59e0b"))
    curves = [(k, [v for v in c if v > 0 and math.isfinite(v)], color) for k, c, color in curves]
    curves = [c for c in curves if c[1]]
    if not curves:
        return ""
    w, h, pad = 440, 220, 36
    ys = [math.log10(v) for _, c, _ in curves for v in c]
    y0, y1 = min(ys), max(ys)
    sy = lambda y: h - pad + (y - y0) / (y1 - y0 or 1) * (2 * pad - h)  # noqa: E731
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="plot" id="plot-loss" width="{w}" height="{h}">',
             '<text x="4" y="14" font-size="12">training loss against steps (log scale): layer-wise per site '
             '(grey), distillation (orange)</text>',
             f'<line x1="{pad}" y1="{h - pad}" x2="{w - pad}" y2="{h - pad}" stroke="#111"/>'
             f'<line x1="{pad}" y1="{h - pad}" x2="{pad}" y2="{pad}" stroke="#111"/>'
             f'<text x="2" y="{h - pad}" font-size="10">{10 ** y0:.2g}</text>'
             f'<text x="2" y="{pad + 4}" font-size="10">{10 ** y1:.2g}</text>']
    for key, c, color in curves:
        step = (w - 2 * pad) / max(len(c) - 1, 1)
        pts = " ".join(f"{pad + i * step:.1f},{sy(math.log10(v)):.1f}" for i, v in enumerate(c))
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{pts}">'
                     f"<title>{html.escape(key)}</title></polyline>")
    parts.append("</svg>")
    return "".join(parts)


def _site_table(sites: list[dict]) -> str:
    head = ("site", "op", "rule", "substitute", "status", "params", "FLOPs", "weight error", "sqnr dB (init)",
            "sqnr dB", "rel L2", "cosine", "latency µs", "speed-up", "note")
    rows = []
    for s in sites:
        err, init, lat = s.get("error") or {}, s.get("error_init") or {}, s.get("latency")
        text = [s["key"], f"{s['op']} ({s['form']})", s["rule"] or "—", s["substitute"] or "—"]
        text2 = [f"{fmt(s['params_before'])} → {fmt(s['params_after'])}",
                 f"{fmt(s['flops_before'])} → {fmt(s['flops_after'])}", fmt(s.get("reconstruction_error")),
                 fmt(init.get("sqnr_db")), fmt(err.get("sqnr_db")), fmt(err.get("rel_l2")), fmt(err.get("cosine")),
                 f"{lat['original_us']:.1f} → {lat['substitute_us']:.1f}" if lat else "—",
                 f"{lat['speedup']:.2f}×" if lat else "—", s.get("reason") or ""]
        status = f'<span class="{s["status"]}">{s["status"]}</span>'  # the one cell that is markup
        cells = [html.escape(c) for c in text] + [status] + [html.escape(c) for c in text2]
        rows.append(f'<tr id="site-{html.escape(s["key"])}" data-site="{html.escape(s["key"])}">'
                    + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return ('<table id="sites"><thead><tr>' + "".join(f"<th>{h}</th>" for h in head) + "</tr></thead><tbody>"
            + "".join(rows) + "</tbody></table>")


def _page(title: str, body: str) -> str:
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{CSS}</style></head><body>{body}<script>{SCRIPT}</script></body></html>\n")


def _summary(report: dict[str, Any]) -> str:
    e, t = report["end_to_end"], report["totals"]
    metrics = " · ".join(f"{k} {fmt(e.get(k))}" for k in (*ERROR_KEYS, "top1_agreement"))
    unused = f", unused {t['unused']}" if t.get("unused") else ""
    return (f"<p>Rules <code>{html.escape(str(report['rules']))}</code> · sites {t['sites']}: applied {t['applied']}, "
            f"rolled back {t['rolled_back']}, gated {t.get('gated', 0)}, over budget {t.get('over_budget', 0)}, skipped {t['skipped']}{unused}</p>"
            f"<p>End to end: {html.escape(metrics)} · params "
            f"{html.escape(change(e['params_before'], e['params_after'], 'smaller', 'larger'))} · linear/conv FLOPs "
            f"{html.escape(change(e['flops_before'], e['flops_after'], 'fewer', 'more'))}</p>"
            + _outputs(e) + (f"<p>{html.escape(line)}</p>" if (line := budget_line(report)) else ""))


def _outputs(e: dict[str, Any]) -> str:
    """The user's metrics, each output's line (models with several), and the degenerate-reference flag."""
    mine = "".join(f"<li>{html.escape(line)}</li>" for line in metric_lines(e))
    mine = f"<p>Your metrics (evaluate()), original → saved model:</p><ul>{mine}</ul>" if mine else ""
    items = [f"<li><code>{html.escape(o['name'])}</code>: {html.escape(output_line(o))}</li>" for o in e.get("outputs") or []]
    flag = (f'<p class="rolled_back">The original model\'s output is {html.escape(e["degenerate_reference"])}: relative '
            "metrics mean nothing on these inputs.</p>") if e.get("degenerate_reference") else ""
    return mine + flag + (f"<ul>{''.join(items)}</ul>" if items else "")


def report_page(report: dict[str, Any]) -> str:
    """report.html of one optimize run."""
    g = report.get("graphs") or {}
    graphs_html = _graph_panes(("original", g["original"], report["sites"]), ("rewritten", g["rewritten"], report["sites"])) if g else \
        "<p>No graphs in this report.</p>"
    body = (f"<h1>fxopt report: {html.escape(str(report['model']))}</h1>{_summary(report)}"
            f'<h2>Summary plots</h2><div class="plots">{_scatter(report["sites"])}{_time_bars(report["sites"])}'
            f'{_loss_curves(report)}</div>'
            f"<h2>Graphs</h2>{_legend()}{graphs_html}<h2>Sites</h2>{_site_table(report['sites'])}")
    return _page(f"fxopt report: {report['model']}", body)


def diff_page(a: dict[str, Any], b: dict[str, Any], names: tuple[str, str]) -> str:
    """The graph diff of two saved results: both graphs (rewritten forms), unmatched nodes marked,
    and each site's outcome on both sides."""
    ga, gb = a["graphs"]["rewritten"], b["graphs"]["rewritten"]
    sites_b = {s["key"]: s for s in b["sites"]}
    rows = []
    for s in a["sites"]:
        t = sites_b.get(s["key"])
        cells = [s["key"]]
        for side in (s, t):
            if side is None:
                cells += ["—"] * 4
                continue
            err = side.get("error") or {}
            cells += [f"{side['substitute'] or '—'}: {side['status']}",
                      f"{fmt(side['params_before'])} → {fmt(side['params_after'])}", fmt(err.get("sqnr_db")),
                      f"{side['latency']['speedup']:.2f}×" if side.get("latency") else "—"]
        rows.append(f'<tr id="site-{html.escape(s["key"])}" data-site="{html.escape(s["key"])}">'
                    + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
    head = ["site"] + [f"{n}: {c}" for n in ("A", "B") for c in ("status", "params", "sqnr dB", "speed-up")]
    table = ('<table id="sites"><thead><tr>' + "".join(f"<th>{html.escape(h)}</th>" for h in head)
             + "</tr></thead><tbody>" + "".join(rows) + "</tbody></table>")
    body = (f"<h1>fxopt diff</h1><p>A: <code>{html.escape(names[0])}</code> ({html.escape(str(a['rules']))}) · "
            f"B: <code>{html.escape(names[1])}</code> ({html.escape(str(b['rules']))})</p>"
            f"<h2>A</h2>{_summary(a)}<h2>B</h2>{_summary(b)}<h2>Graphs</h2>{_legend()}"
            f"{_graph_panes(('A: ' + names[0], ga, a['sites']), ('B: ' + names[1], gb, b['sites']))}<h2>Sites</h2>{table}")
    return _page("fxopt diff", body)
