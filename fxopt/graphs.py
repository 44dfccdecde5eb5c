"""Graphs for reports: an fx graph as plain data, node matching between two graphs, collapsing of
unchanged runs, and drawing to SVG.

* `summarize(gm, sites)`: nodes (name, op, target, shape, site key) and edges, JSON-ready; this is
  what `report.json` keeps under `graphs`, so `fxopt diff` can compare saved results without
  their model code.
* `match(a, b)`: pairs nodes of two summaries with networkx: same name and op first, then
  unmatched nodes whose matched predecessor's counterpart has an unmatched successor with the
  same op and target.
* `collapse(g, keep)`: runs of ≥ 3 chained nodes that are not in `keep` become one node
  ("12 unchanged nodes"), so a ResNet-50 stays readable.
* `svg(g, …)`: graphviz `dot` when it is installed, else a layered layout computed here
  (longest-path depth from the inputs), drawn as plain SVG; the report never fails for lack of
  graphviz.
"""

from __future__ import annotations

import html
import shutil
import subprocess
from typing import Any

import networkx as nx
from torch import fx

MIN_RUN = 3  # chains at least this long collapse


def _target(n: fx.Node) -> str:
    t = n.target
    if isinstance(t, str):
        return t
    return getattr(t, "__name__", None) or str(t)


def summarize(gm: fx.GraphModule, sites: dict[str, str] | None = None) -> dict[str, Any]:
    """{"nodes": [...], "edges": [[src, dst], ...]}; `sites` maps node names to site keys."""
    sites = sites or {}
    nodes, edges = [], []
    for n in gm.graph.nodes:
        meta = n.meta.get("tensor_meta")
        shape = list(meta.shape) if meta is not None and hasattr(meta, "shape") else None
        label = _target(n)
        if n.op == "call_module":
            label = f"{n.target}: {type(gm.get_submodule(n.target)).__name__}"
        nodes.append({"name": n.name, "op": n.op, "target": _target(n), "label": label, "shape": shape,
                      "site": sites.get(n.name)})
        edges += [[p.name, n.name] for p in n.all_input_nodes]
    return {"nodes": nodes, "edges": edges}


def to_nx(summary: dict[str, Any]) -> nx.DiGraph:
    g = nx.DiGraph()
    for i, node in enumerate(summary["nodes"]):
        g.add_node(node["name"], order=i, **{k: v for k, v in node.items() if k != "name"})
    g.add_edges_from(tuple(e) for e in summary["edges"])
    return g


def match(a: nx.DiGraph, b: nx.DiGraph) -> dict[str, str]:
    """Node of `a` → node of `b`, for the nodes that correspond."""
    pairs = {n: n for n in a if n in b and a.nodes[n]["op"] == b.nodes[n]["op"]}
    taken = set(pairs.values())
    changed = True
    while changed:  # grow from matched predecessors, in graph order
        changed = False
        for n in sorted(a, key=lambda x: a.nodes[x]["order"]):
            if n in pairs:
                continue
            for p in a.predecessors(n):
                if p not in pairs:
                    continue
                for cand in b.successors(pairs[p]):
                    if cand not in taken and b.nodes[cand]["op"] == a.nodes[n]["op"] \
                            and b.nodes[cand]["target"] == a.nodes[n]["target"]:
                        pairs[n] = cand
                        taken.add(cand)
                        changed = True
                        break
                if n in pairs:
                    break
    return pairs


def collapse(g: nx.DiGraph, keep: set[str]) -> nx.DiGraph:
    """A copy of `g` in which chains of ≥ MIN_RUN nodes outside `keep` (each with one input and
    one output inside the chain) are one node labelled with their count."""
    g = g.copy()
    order = sorted(g, key=lambda x: g.nodes[x]["order"])

    def link(n: str) -> bool:
        return n not in keep and g.in_degree(n) <= 1 and g.out_degree(n) <= 1 and g.nodes[n]["op"] not in (
            "placeholder", "output")

    seen: set[str] = set()
    for start in order:
        if start in seen or start not in g or not link(start):
            continue
        run = [start]
        while True:
            nxt = list(g.successors(run[-1]))
            if len(nxt) != 1 or nxt[0] in seen or not link(nxt[0]) or g.in_degree(nxt[0]) != 1:
                break
            run.append(nxt[0])
        seen.update(run)
        if len(run) < MIN_RUN:
            continue
        name = f"collapsed_{run[0]}"
        preds, succs = list(g.predecessors(run[0])), list(g.successors(run[-1]))
        g.add_node(name, order=g.nodes[run[0]]["order"], op="collapsed", target="", site=None,
                   label=f"{len(run)} unchanged nodes", shape=g.nodes[run[-1]].get("shape"), members=run)
        g.remove_nodes_from(run)
        g.add_edges_from((p, name) for p in preds)
        g.add_edges_from((name, s) for s in succs)
    return g


COLORS = {"site": "#f59e0b", "site_kept": "#fef9c3", "changed": "#ef4444", "collapsed": "#e5e7eb", "io": "#bfdbfe", "plain": "#ffffff"}


def _kind(g: nx.DiGraph, n: str, changed: set[str]) -> str:
    d = g.nodes[n]
    if d.get("site") and d.get("status", "applied") == "applied":
        return "site"
    if n in changed:
        return "changed"
    if d.get("site"):
        return "site_kept"
    if d["op"] == "collapsed":
        return "collapsed"
    if d["op"] in ("placeholder", "output"):
        return "io"
    return "plain"


def _label(d: dict[str, Any]) -> str:
    text = d["label"]
    text = text if len(text) <= 34 else text[:31] + "…"
    if d.get("shape") is not None:
        text += "  " + "×".join(str(s) for s in d["shape"])
    return text


def svg(g: nx.DiGraph, graph_id: str, changed: set[str] | None = None, engine: str = "auto") -> str:
    """The graph as an inline SVG element; site nodes link to `#site-<key>`."""
    changed = changed or set()
    if engine in ("auto", "dot") and shutil.which("dot"):
        try:
            return _dot_svg(g, graph_id, changed)
        except (subprocess.SubprocessError, OSError):
            if engine == "dot":
                raise
    return _layered_svg(g, graph_id, changed)


def _layered_svg(g: nx.DiGraph, graph_id: str, changed: set[str]) -> str:
    depth: dict[str, int] = {}
    for n in nx.topological_sort(g):
        depth[n] = max((depth[p] + 1 for p in g.predecessors(n)), default=0)
    layers: dict[int, list[str]] = {}
    for n in sorted(g, key=lambda x: g.nodes[x]["order"]):
        layers.setdefault(depth[n], []).append(n)
    box_w, box_h, gap_x, gap_y, pad = 260, 30, 24, 22, 10
    width = max(len(v) for v in layers.values()) * (box_w + gap_x) + 2 * pad if layers else 100
    pos = {}
    for d, names in layers.items():
        row_w = len(names) * (box_w + gap_x) - gap_x
        for i, n in enumerate(names):
            pos[n] = ((width - row_w) / 2 + i * (box_w + gap_x), pad + d * (box_h + gap_y))
    height = (max(layers) + 1) * (box_h + gap_y) + 2 * pad if layers else 100
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="graph" id="{graph_id}" width="{width:.0f}" '
             f'height="{height:.0f}" viewBox="0 0 {width:.0f} {height:.0f}">']
    for u, v in g.edges:
        (x1, y1), (x2, y2) = pos[u], pos[v]
        parts.append(f'<line x1="{x1 + box_w / 2:.0f}" y1="{y1 + box_h:.0f}" x2="{x2 + box_w / 2:.0f}" '
                     f'y2="{y2:.0f}" stroke="#9ca3af" stroke-width="1.2"/>')
    for n, (x, y) in pos.items():
        d = g.nodes[n]
        kind = _kind(g, n, changed)
        rect = (f'<rect x="{x:.0f}" y="{y:.0f}" width="{box_w}" height="{box_h}" rx="5" fill="{COLORS[kind]}" '
                f'stroke="#374151" stroke-width="{2 if kind in ("site", "changed") else 1}"/>'
                f'<text x="{x + 8:.0f}" y="{y + 19:.0f}" font-size="11" font-family="monospace">'
                f'{html.escape(_label(d))}</text><title>{html.escape(n + ": " + d["label"])}</title>')
        node = f'<g class="node {kind}" id="{graph_id}-{html.escape(n)}">{rect}</g>'
        if d.get("site"):
            node = f'<a href="#site-{html.escape(d["site"])}">{node}</a>'
        parts.append(node)
    parts.append("</svg>")
    return "".join(parts)


def _dot_svg(g: nx.DiGraph, graph_id: str, changed: set[str]) -> str:
    def q(s: str) -> str:
        return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'

    lines = [f"digraph {q(graph_id)} {{", 'node [shape=box, style="rounded,filled", fontname="monospace", fontsize=10];']
    for n in sorted(g, key=lambda x: g.nodes[x]["order"]):
        d = g.nodes[n]
        kind = _kind(g, n, changed)
        url = f', URL={q("#site-" + d["site"])}' if d.get("site") else ""
        lines.append(f'{q(n)} [label={q(_label(d))}, fillcolor={q(COLORS[kind])}, id={q(graph_id + "-" + n)}, '
                     f'class={q(kind)}{url}];')  # graphviz adds "node"
    lines += [f"{q(u)} -> {q(v)};" for u, v in g.edges] + ["}"]
    out = subprocess.run(["dot", "-Tsvg"], input="\n".join(lines), capture_output=True, text=True, timeout=60,
                         check=True).stdout
    start = out.index("<svg")
    return out[start:].replace("<svg", f'<svg class="graph" id="{graph_id}"', 1)
