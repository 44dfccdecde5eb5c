"""Find linear/convolution sites in an fx graph, whatever form they take, and pick a rule for each.

A *site* is one application of a linear or convolution layer. Three forms reach us:

* `module`: a `call_module` node on an `nn.Linear` / `nn.Conv1d` / `nn.Conv2d` (symbolic_trace);
* `functional`: `F.linear`, `torch.conv2d`, `aten.linear.default`, … on `get_attr` parameters
  (symbolic_trace of functional code, and every torch.export graph);
* `matmul`: `x @ w.t() + b` written by hand — matched as a multi-node pattern with networkx
  subgraph matching (`Pattern`), bias optional, `w.t()`, `w.T`, `w.transpose(0, 1)` or a stored
  `in × out` matrix.

Every site carries an `nn.Module` equivalent to the original computation (the module itself, or a
dense module built on the very same parameter tensors), which is what substitutes'
`from_original` receive and what validation compares against.
"""

from __future__ import annotations

import fnmatch
import operator
import re
from dataclasses import dataclass, field
from typing import Callable

import networkx as nx
import torch
import torch.nn.functional as F
from networkx.algorithms.isomorphism import DiGraphMatcher
from torch import fx, nn

from .rules import Rule, RuleSet

aten = torch.ops.aten
MODULE_OPS = ((nn.Conv1d, "conv1d"), (nn.Conv2d, "conv2d"), (nn.Linear, "linear"))
FUNCTION_OPS = {
    F.linear: "linear", torch._C._nn.linear: "linear", aten.linear.default: "linear",
    F.conv1d: "conv1d", torch.conv1d: "conv1d", aten.conv1d.default: "conv1d",
    F.conv2d: "conv2d", torch.conv2d: "conv2d", aten.conv2d.default: "conv2d",
}
CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
CONV_DEFAULTS = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}
MATMULS = {operator.matmul, torch.matmul, aten.matmul.default, torch.mm, aten.mm.default}
ADDS = {operator.add, torch.add, aten.add.Tensor}


@dataclass
class Site:
    key: str  # unique in the graph ("fc", or "fc@2" for the second call of a shared layer)
    name: str  # qualified name of the layer (what rules match)
    op: str  # linear | conv1d | conv2d
    form: str  # module | functional | matmul
    nodes: tuple[fx.Node, ...]  # nodes the rewrite replaces; the last one produces the output
    input: fx.Node
    module: nn.Module  # the original module, or an equivalent one on the same parameters
    order: int  # execution order among all sites
    module_types: tuple[str, ...] = ()  # class names (MRO) for module calls
    params: tuple[str, ...] = ()  # qualified names of the parameters the site reads

    @property
    def output(self) -> fx.Node:
        return self.nodes[-1]

    @property
    def in_shape(self) -> torch.Size:
        return self.input.meta["tensor_meta"].shape

    @property
    def out_shape(self) -> torch.Size:
        return self.output.meta["tensor_meta"].shape

    def shape_values(self) -> dict[str, tuple[int, ...]]:
        w = self.module.weight
        if self.op == "linear":
            return {"in_features": (w.shape[1],), "out_features": (w.shape[0],)}
        return {"in_channels": (w.shape[1] * self.module.groups,), "out_channels": (w.shape[0],),
                "kernel_size": tuple(w.shape[2:])}


# --- multi-node patterns with networkx -----------------------------------------------------

@dataclass(frozen=True)
class Pattern:
    """A small DAG of node predicates; an edge (src, dst, positions) says src feeds dst at one of
    those argument positions. `find` returns each match as {pattern name: fx node}."""

    nodes: dict[str, Callable[[fx.Node], bool]]
    edges: tuple[tuple[str, str, frozenset[int]], ...]

    def find(self, graph: nx.DiGraph) -> list[dict[str, fx.Node]]:
        pattern = nx.DiGraph()
        for name, pred in self.nodes.items():
            pattern.add_node(name, pred=pred)
        for src, dst, positions in self.edges:
            pattern.add_edge(src, dst, positions=positions)
        matcher = DiGraphMatcher(
            graph, pattern,
            node_match=lambda g, p: p["pred"](g["node"]),
            edge_match=lambda g, p: bool(g["positions"] & p["positions"]),
        )
        return [{p: graph.nodes[g]["node"] for g, p in mapping.items()}
                for mapping in matcher.subgraph_monomorphisms_iter()]


def to_networkx(graph: fx.Graph) -> nx.DiGraph:
    """The fx graph as a DiGraph; edge attribute `positions` = argument positions of the input."""
    g = nx.DiGraph()
    for node in graph.nodes:
        g.add_node(node.name, node=node)
    for node in graph.nodes:
        flat = list(node.args) + list(node.kwargs.values())
        for pos, arg in enumerate(flat):
            for inp in _nodes_in(arg):
                g.add_edge(inp.name, node.name)
                g.edges[inp.name, node.name].setdefault("positions", set()).add(pos)
    for _, _, data in g.edges(data=True):
        data["positions"] = frozenset(data["positions"])
    return g


def _nodes_in(arg) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg(arg, lambda n: found.append(n))
    return found


def _is_call(node: fx.Node, targets: set, methods: tuple[str, ...] = ()) -> bool:
    return (node.op == "call_function" and node.target in targets) or \
        (node.op == "call_method" and node.target in methods)


def _is_transpose(node: fx.Node) -> bool:
    if _is_call(node, {torch.t, aten.t.default, aten.numpy_T.default}, ("t",)):
        return True
    if node.op == "call_function" and node.target is getattr and node.args[1:] == ("T",):
        return True
    if _is_call(node, {torch.transpose, aten.transpose.int}, ("transpose",)):
        return sorted(a % 2 for a in node.args[1:3] if isinstance(a, int)) == [0, 1]
    if _is_call(node, {aten.permute.default}, ("permute",)):
        return list(node.args[1:]) in ([[1, 0]], [1, 0])
    return False


def _is_matrix_attr(node: fx.Node) -> bool:
    return node.op == "get_attr" and node.meta.get("tensor_meta") is not None \
        and len(node.meta["tensor_meta"].shape) == 2


def _is_vector_attr(node: fx.Node) -> bool:
    return node.op == "get_attr" and node.meta.get("tensor_meta") is not None \
        and len(node.meta["tensor_meta"].shape) == 1


def _is_plain_add(node: fx.Node) -> bool:
    return _is_call(node, ADDS, ("add",)) and node.kwargs.get("alpha", 1) == 1 and len(node.args) == 2


def _is_matmul(node: fx.Node) -> bool:
    return _is_call(node, MATMULS, ("matmul", "mm"))


ANY = frozenset({0, 1})
MATMUL_PATTERNS = {
    # name: (pattern, weight is stored out × in)
    "t+bias": (Pattern({"w": _is_matrix_attr, "t": _is_transpose, "mm": _is_matmul, "b": _is_vector_attr,
                        "add": _is_plain_add},
                       (("w", "t", frozenset({0})), ("t", "mm", frozenset({1})), ("mm", "add", ANY),
                        ("b", "add", ANY))), True),
    "t": (Pattern({"w": _is_matrix_attr, "t": _is_transpose, "mm": _is_matmul},
                  (("w", "t", frozenset({0})), ("t", "mm", frozenset({1})))), True),
    "bias": (Pattern({"w": _is_matrix_attr, "mm": _is_matmul, "b": _is_vector_attr, "add": _is_plain_add},
                     (("w", "mm", frozenset({1})), ("mm", "add", ANY), ("b", "add", ANY))), False),
    "plain": (Pattern({"w": _is_matrix_attr, "mm": _is_matmul}, (("w", "mm", frozenset({1})),)), False),
}


# --- finding sites ---------------------------------------------------------------------------

def find_sites(gm: fx.GraphModule) -> list[Site]:
    """Every linear/conv site of `gm`, in execution order."""
    found: list[tuple[fx.Node, Site]] = []
    for node in gm.graph.nodes:
        site = _module_site(gm, node) or _functional_site(gm, node)
        if site is not None:
            found.append((node, site))
    found += _matmul_sites(gm)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    found.sort(key=lambda pair: order[pair[1].output])
    sites, seen = [], {}
    for i, (_, site) in enumerate(found):
        seen[site.name] = seen.get(site.name, 0) + 1
        site.key = site.name if seen[site.name] == 1 else f"{site.name}@{seen[site.name]}"
        site.order = i
        sites.append(site)
    return sites


def _module_site(gm: fx.GraphModule, node: fx.Node) -> Site | None:
    if node.op != "call_module":
        return None
    module = gm.get_submodule(node.target)
    for cls, op in MODULE_OPS:
        # subclasses that override forward compute something else: not a plain site
        if isinstance(module, cls) and type(module).forward is cls.forward and node.args:
            types = tuple(c.__name__ for c in type(module).__mro__ if issubclass(c, nn.Module) and c is not nn.Module)
            params = tuple(f"{node.target}.{n}" for n, _ in module.named_parameters())
            return Site("", node.target, op, "module", (node,), node.args[0], module, 0, types, params)
    return None


def _functional_site(gm: fx.GraphModule, node: fx.Node) -> Site | None:
    if node.op != "call_function" or node.target not in FUNCTION_OPS:
        return None
    op = FUNCTION_OPS[node.target]
    names = CONV_ARGS if op != "linear" else CONV_ARGS[:3]
    args = {**({k: v for k, v in CONV_DEFAULTS.items() if k in names}), **dict(zip(names, node.args)), **node.kwargs}
    weight, bias = args["weight"], args["bias"]
    if not _is_param(weight) or not (bias is None or _is_param(bias)):
        return None  # weights computed at run time are not layers we can factor ahead of time
    w = _fetch(gm, weight.target).detach()
    b = None if bias is None else _fetch(gm, bias.target).detach()
    if op == "linear":
        module = _dense_linear(w, b)
    else:
        module = _dense_conv(op, w, b, args)
    params = tuple(n.target for n in (weight, bias) if n is not None)
    return Site("", _layer_name(weight.target), op, "functional", (node,), args["input"], module, 0, (), params)


def _matmul_sites(gm: fx.GraphModule) -> list[tuple[fx.Node, Site]]:
    graph = to_networkx(gm.graph)
    taken: set[fx.Node] = set()
    out = []
    for kind, (pattern, transposed) in MATMUL_PATTERNS.items():
        for m in pattern.find(graph):
            mm = m["mm"]
            if mm in taken or (("add" in m) and len(mm.users) != 1):
                continue
            if "add" in m and m["b"].meta["tensor_meta"].shape[0] != mm.meta["tensor_meta"].shape[-1]:
                continue  # a bias must have one value per output feature
            x = mm.args[0]
            if not isinstance(x, fx.Node) or x.op == "get_attr" or x.meta.get("tensor_meta") is None:
                continue  # a product of parameters, or an untracked operand, is not a layer
            w = _fetch(gm, m["w"].target).detach()
            weight = w if transposed else w.t()
            b = _fetch(gm, m["b"].target).detach() if "add" in m else None
            nodes = tuple(n for n in (m.get("t"), mm, m.get("add")) if n is not None)
            taken.add(mm)
            params = tuple(m[k].target for k in ("w", "b") if k in m)
            site = Site("", _layer_name(m["w"].target), "linear", "matmul", nodes, x,
                        _dense_linear(weight, b), 0, (), params)
            out.append((mm, site))
    return out


def _is_param(node) -> bool:
    return isinstance(node, fx.Node) and node.op == "get_attr"


def _fetch(gm: fx.GraphModule, target: str) -> torch.Tensor:
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _layer_name(target: str) -> str:
    return target[: -len(".weight")] if target.endswith(".weight") else target


def _dense_linear(w: torch.Tensor, b: torch.Tensor | None) -> nn.Linear:
    module = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device="meta", dtype=w.dtype)
    module.weight = nn.Parameter(w, requires_grad=False)  # shares storage with the graph's parameter
    if b is not None:
        module.bias = nn.Parameter(b, requires_grad=False)
    return module


def _dense_conv(op: str, w: torch.Tensor, b: torch.Tensor | None, args: dict) -> nn.Module:
    cls = nn.Conv1d if op == "conv1d" else nn.Conv2d
    module = cls(w.shape[1] * args["groups"], w.shape[0], tuple(w.shape[2:]), stride=args["stride"],
                 padding=args["padding"], dilation=args["dilation"], groups=args["groups"],
                 bias=b is not None, device="meta", dtype=w.dtype)
    module.weight = nn.Parameter(w, requires_grad=False)
    if b is not None:
        module.bias = nn.Parameter(b, requires_grad=False)
    return module


# --- what a site's output feeds -----------------------------------------------------------------

CONSUMERS: dict[str, tuple[set, tuple[str, ...], tuple[type, ...]]] = {
    # kind: (call_function targets, call_method names, module classes)
    "softmax": ({F.softmax, torch.softmax, aten._softmax.default, aten.softmax.int}, ("softmax",), (nn.Softmax,)),
    "log_softmax": ({F.log_softmax, torch.log_softmax, aten._log_softmax.default, aten.log_softmax.int},
                    ("log_softmax",), (nn.LogSoftmax,)),
    "argmax": ({torch.argmax, aten.argmax.default}, ("argmax",), ()),
    "topk": ({torch.topk, aten.topk.default}, ("topk",), ()),
    "cross_entropy": ({F.cross_entropy, aten.cross_entropy_loss.default}, (), (nn.CrossEntropyLoss,)),
    "output": (set(), (), ()),
}


def consumer_kind(user: fx.Node) -> str | None:
    """The CONSUMERS kind of a node that uses a site's output, or None."""
    if user.op == "output":
        return "output"
    for kind, (functions, methods, modules) in CONSUMERS.items():
        if user.op == "call_function" and user.target in functions or user.op == "call_method" and user.target in methods:
            return kind
        if user.op == "call_module" and modules and isinstance(user.graph.owning_module.get_submodule(user.target), modules):
            return kind
    return None


def feeds_mismatch(site: Site, kinds: tuple[str, ...]) -> str | None:
    """Why the site's output does not feed only consumers of these kinds, or None."""
    users = list(site.output.users)
    if not users:
        return "its output is unused"
    for user in users:
        if consumer_kind(user) not in kinds:
            return f"its output feeds {user.name} ({user.op} {getattr(user.target, '__name__', user.target)}), not {'/'.join(kinds)}"
    return None


# --- choosing a rule per site ------------------------------------------------------------------

@dataclass
class Decision:
    site: Site
    rule: Rule | None
    reason: str | None  # why no rule matched
    also_matched: tuple[str, ...] = field(default_factory=tuple)  # lower-priority rules that matched


def rule_mismatch(rule: Rule, site: Site, first: int, last: int) -> str | None:
    """Why `rule` does not match `site`, or None when it does."""
    m = rule.match
    if site.op not in m.ops:
        return f"op {site.op} not in {'/'.join(m.ops)}"
    if m.module_types and not set(m.module_types) & set(site.module_types):
        what = site.module_types[0] if site.module_types else f"a {site.form} call"
        return f"{what} is not {'/'.join(m.module_types)}"
    if m.names and not any(fnmatch.fnmatchcase(site.name, g) for g in m.names):
        return f"name {site.name!r} matches none of {', '.join(m.names)}"
    if m.name_regex and not re.search(m.name_regex, site.name):
        return f"name {site.name!r} does not match /{m.name_regex}/"
    values = site.shape_values()
    for key, bound in m.shape:
        for value in values.get(key, ()):
            if (why := bound.reason(key, value)) is not None:
                return why
    if m.feeds and (why := feeds_mismatch(site, m.feeds)) is not None:
        return why
    ex = m.exclude
    if ex.first and site.order == first:
        return "excluded: first layer"
    if ex.last and site.order == last:
        return "excluded: last layer"
    if any(fnmatch.fnmatchcase(site.name, g) for g in ex.names) or (ex.name_regex and re.search(ex.name_regex, site.name)):
        return f"excluded by name ({site.name})"
    return None


def choose_rules(sites: list[Site], ruleset: RuleSet) -> list[Decision]:
    """For each site, the matching rule of highest priority (ties: earliest in the file)."""
    first, last = (sites[0].order, sites[-1].order) if sites else (-1, -1)
    decisions = []
    for site in sites:
        matched, reasons = [], []
        for rule in ruleset.rules:
            why = rule_mismatch(rule, site, first, last)
            (reasons if why else matched).append((rule, why))
        if not matched:
            relevant = [(r, why) for r, why in reasons if site.op in r.match.ops]
            reason = "; ".join(f"{r.name}: {why}" for r, why in relevant) or f"no rule is for {site.op}"
            decisions.append(Decision(site, None, reason))
            continue
        matched.sort(key=lambda pair: (-pair[0].priority, pair[0].index))
        decisions.append(Decision(site, matched[0][0], None, tuple(r.name for r, _ in matched[1:])))
    return decisions
