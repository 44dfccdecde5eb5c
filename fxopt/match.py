"""Find linear/convolution sites in an fx graph, whatever form they take, and pick a rule for each.

A *site* is one application of a linear or convolution layer. Three forms reach us:

* `module`: a `call_module` node on an `nn.Linear` / `nn.Conv1d` / `nn.Conv2d` (symbolic_trace);
* `functional`: `F.linear`, `torch.conv2d`, `aten.linear.default`, … on `get_attr` parameters
  (symbolic_trace of functional code, and every torch.export graph);
* `matmul`: `x @ w.t() + b` written by hand — matched as a multi-node pattern with networkx
  subgraph matching (`Pattern`), bias optional, `w.t()`, `w.T`, `w.transpose(0, 1)` or a stored
  `in × out` matrix; and the other spellings real code uses for a linear layer (`contraction`):
  `torch.addmm(b, x, w)` with `w` stored in × out (Hugging Face's `Conv1D`: GPT-2 and its
  descendants), `torch.bmm(x, w.expand(B, …))` / `torch.baddbmm(b, x, …)` against one matrix
  shared across the batch, and `einsum` equations that contract the last dimension of `x` with a
  matrix (`'...i,oi->...o'`, `'bsi,io->bso'`).

A weight may also be a block of rows of a parameter (`w.chunk(3)[0]`, `w.split([E, 2E])[1]`,
`w[a:b]`): that is how `nn.MultiheadAttention` projects queries, keys and values with its one
packed `in_proj_weight` when they differ. Such a site is named after the block
(`attn.in_proj.q`, `.k`, `.v`, `.kv`; other blocks `….rows_A_B`). A parameter named `…_weight`
names its layer without the suffix (`attn.in_proj_weight` → `attn.in_proj`).

Every site carries an `nn.Module` equivalent to the original computation (the module itself, or a
dense module built on the very same parameter tensors), which is what substitutes'
`from_original` receive and what validation compares against.
"""

from __future__ import annotations

import fnmatch
import operator
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import networkx as nx
import torch
import torch.nn.functional as F
from networkx.algorithms.isomorphism import DiGraphMatcher
from torch import fx, nn

if TYPE_CHECKING:  # rules.py imports this module (CONSUMERS); this one needs its types only
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
    found += _contraction_sites(gm)
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
    weight = param_rows(gm, args["weight"])
    bias = None if args["bias"] is None else param_rows(gm, args["bias"])
    if weight is None or (args["bias"] is not None and bias is None):
        return None  # weights computed at run time are not layers we can factor ahead of time
    w, b = weight.tensor(gm), None if bias is None else bias.tensor(gm)
    if op == "linear":
        module = _dense_linear(w, b)
    else:
        module = _dense_conv(op, w, b, args)
    params = tuple(r.target for r in (weight, bias) if r is not None)
    return Site("", weight.layer_name(), op, "functional", (node,), args["input"], module, 0, (), params)


# --- parameters, whole or as a block of rows ------------------------------------------------

@dataclass(frozen=True)
class Rows:
    """Rows [start, stop) of the parameter at `target` (the whole of it when `start` is None)."""

    target: str
    start: int | None = None
    stop: int | None = None
    total: int = 0

    def tensor(self, gm: fx.GraphModule) -> torch.Tensor:
        t = _fetch(gm, self.target).detach()
        return t if self.start is None else t[self.start:self.stop]

    def layer_name(self) -> str:
        name = _layer_name(self.target)
        if self.start is None:
            return name
        if name.endswith("in_proj") and self.total % 3 == 0:  # nn.MultiheadAttention's packed q, k, v
            third = self.total // 3
            part = {(0, 1): "q", (1, 2): "k", (2, 3): "v", (1, 3): "kv", (0, 2): "qk"}.get(
                (self.start // third, self.stop // third) if self.start % third == self.stop % third == 0 else None)
            if part:
                return f"{name}.{part}"
        return f"{name}.rows_{self.start}_{self.stop}"


SPLITS = {aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default, torch.split, torch.chunk}
SLICES = {aten.slice.Tensor, aten.narrow.default, torch.narrow}


def param_rows(gm: fx.GraphModule, node) -> Rows | None:
    """The parameter (or block of its rows) that `node` reads, or None for anything computed."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "get_attr":
        return Rows(node.target)
    if node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[1], int):
        parts = _split_rows(gm, node.args[0])
        if parts is None or not 0 <= node.args[1] < len(parts[1]):
            return None
        target, bounds, total = parts
        return _rows(target, *bounds[node.args[1]], total)
    if node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[1], slice):
        sl = node.args[1]
        if sl.step in (None, 1):
            return _slice_rows(gm, node.args[0], (0, sl.start or 0, sl.stop))
    if _is_call(node, SLICES, ("narrow",)):
        dim, start, rest = (node.args[1:] + (0, None))[:3]
        length = node.target is not aten.slice.Tensor
        stop = None if rest is None else (start + rest if length else rest)
        return _slice_rows(gm, node.args[0], (dim, start, stop))
    return None


def _split_rows(gm: fx.GraphModule, node) -> tuple[str, list[tuple[int, int]], int] | None:
    """(target, row bounds of each part, total rows) for a split/chunk of a parameter along dim 0."""
    if not isinstance(node, fx.Node) or not _is_call(node, SPLITS, ("split", "chunk", "split_with_sizes")):
        return None
    base, how = node.args[0], node.args[1]
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    if not isinstance(base, fx.Node) or base.op != "get_attr" or dim not in (0, -_ndim(gm, base)):
        return None
    total = _fetch(gm, base.target).shape[0]
    chunk = node.target in (aten.chunk.default, torch.chunk) or (node.op == "call_method" and node.target == "chunk")
    if isinstance(how, int):
        size = -(-total // how) if chunk else how
        sizes = [min(size, total - i) for i in range(0, total, size)]
    elif isinstance(how, (list, tuple)) and all(isinstance(v, int) for v in how):
        sizes = list(how)
    else:
        return None
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return base.target, [(a, a + n) for a, n in zip(starts, sizes)], total


def _slice_rows(gm: fx.GraphModule, base, spec) -> Rows | None:
    if not isinstance(base, fx.Node) or base.op != "get_attr":
        return None
    dim, start, stop = spec
    total = _fetch(gm, base.target).shape[0]
    if dim != 0 or not isinstance(start, int) or not (stop is None or isinstance(stop, int)):
        return None
    stop = total if stop is None else min(stop, total)
    start = start + total if start < 0 else start
    if not 0 <= start < stop:
        return None
    return _rows(base.target, start, stop, total)


def _rows(target: str, start: int, stop: int, total: int) -> Rows:
    return Rows(target) if (start, stop) == (0, total) else Rows(target, start, stop, total)


def _ndim(gm: fx.GraphModule, node: fx.Node) -> int:
    return _fetch(gm, node.target).dim()


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


# --- addmm, bmm/baddbmm and einsum spellings of a linear layer ---------------------------------

ADDMMS = {torch.addmm, aten.addmm.default}
BMMS = {torch.bmm, aten.bmm.default}
BADDBMMS = {torch.baddbmm, aten.baddbmm.default}
EINSUMS = {torch.einsum, torch.functional.einsum, aten.einsum.default}
BATCHING = {torch.unsqueeze, aten.unsqueeze.default, aten.expand.default}


def _contraction_sites(gm: fx.GraphModule) -> list[tuple[fx.Node, Site]]:
    out = []
    for node in gm.graph.nodes:
        found = _contraction(gm, node)
        if found is None:
            continue
        x, weight, bias, w_node, b_node = found
        if not isinstance(x, fx.Node) or x.op == "get_attr" or x.meta.get("tensor_meta") is None:
            continue
        params = tuple(n.target for n in (w_node, b_node) if n is not None)
        site = Site("", _layer_name(w_node.target), "linear", "matmul", (node,), x,
                    _dense_linear(weight, bias), 0, (), params)
        out.append((node, site))
    return out


def _contraction(gm: fx.GraphModule, node: fx.Node):
    """(x, weight out × in, bias or None, weight node, bias node) when `node` applies one matrix
    parameter to the last dimension of x; None otherwise."""
    if node.op not in ("call_function", "call_method"):
        return None
    call = node.target
    kw = node.kwargs
    if kw.get("beta", 1) != 1 or kw.get("alpha", 1) != 1 or kw.get("out") is not None:
        return None
    if _is_call(node, ADDMMS, ("addmm",)) and node.op == "call_function" and len(node.args) == 3:
        b, x, m = node.args
        return _with_bias(gm, x, _matrix(gm, m, batched=False), b)
    if _is_call(node, BMMS, ()) and len(node.args) == 2:
        x, m = node.args
        return _with_bias(gm, x, _matrix(gm, m, batched=True), None)
    if _is_call(node, BADDBMMS, ()) and len(node.args) == 3:
        b, x, m = node.args
        return _with_bias(gm, x, _matrix(gm, m, batched=True), b)
    if call in EINSUMS and node.op == "call_function":
        equation, *operands = node.args
        if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
            operands = list(operands[0])
        if not isinstance(equation, str) or len(operands) != 2:
            return None
        return _einsum_linear(gm, equation, operands)
    return None


def _with_bias(gm: fx.GraphModule, x, matrix, b):
    if matrix is None:
        return None
    weight, w_node = matrix
    if b is None:
        return x, weight, None, w_node, None
    if not (isinstance(b, fx.Node) and b.op == "get_attr"):
        return None
    bias = _fetch(gm, b.target).detach()
    if bias.numel() != weight.shape[0] or any(d != 1 for d in bias.shape[:-1]):
        return None  # a bias must have one value per output feature
    return x, weight, bias.reshape(-1), w_node, b


def _matrix(gm: fx.GraphModule, node, batched: bool):
    """The out × in weight of the right-hand operand M of x @ M, when M is a matrix parameter
    (stored in × out: `x @ w`, or out × in behind a transpose: `x @ w.t()`), for bmm/baddbmm
    broadcast across the batch (`w.unsqueeze(0).expand(B, -1, -1)`, `w.expand(B, n, m)`)."""
    flips = 0
    saw_batch = False
    while isinstance(node, fx.Node) and node.op != "get_attr":
        if batched and (_is_call(node, BATCHING, ("unsqueeze", "expand")) or
                        (node.op == "call_method" and node.target == "expand")):
            if node.target in (torch.unsqueeze, aten.unsqueeze.default, "unsqueeze") and node.args[1] != 0:
                return None
            saw_batch = True
        elif _is_transpose(node) or _is_last_two_transpose(node):
            flips += 1
        else:
            return None
        node = node.args[0]
    if not isinstance(node, fx.Node):
        return None
    t = _fetch(gm, node.target)
    if t.dim() == 3 and t.shape[0] == 1 and batched:
        t, saw_batch = t[0], True
    if t.dim() != 2 or (batched and not saw_batch):
        return None
    t = t.detach()
    return (t.t() if flips % 2 == 0 else t), node


def _is_last_two_transpose(node: fx.Node) -> bool:
    """transpose(-1, -2) / transpose(1, 2) of a 3-d operand (bmm's batched matrix)."""
    if not _is_call(node, {torch.transpose, aten.transpose.int}, ("transpose",)):
        return False
    dims = [a for a in node.args[1:3] if isinstance(a, int)]
    return len(dims) == 2 and sorted(d % 3 for d in dims) == [1, 2]


def _einsum_linear(gm: fx.GraphModule, equation: str, operands: list):
    """'...i,oi->...o', 'bsi,io->bso', 'oi,...i->...o': one operand a matrix parameter whose one
    index is contracted with the other operand's last index and whose other index becomes the
    output's last."""
    eq = equation.replace(" ", "")
    if "->" not in eq or eq.count(",") != 1:
        return None
    lhs, out = eq.split("->")
    specs = lhs.split(",")
    for wi in (0, 1):
        w, x = operands[wi], operands[1 - wi]
        ws, xs = specs[wi], specs[1 - wi]
        if not (isinstance(w, fx.Node) and w.op == "get_attr") or len(ws) != 2 or "." in ws:
            continue
        if not xs or xs[-1] not in ws or not out or out[-1] not in ws or xs[-1] == out[-1]:
            continue
        i, o = xs[-1], out[-1]
        if xs[:-1] != out[:-1] or i in out or o in xs:
            continue
        t = _fetch(gm, w.target)
        if t.dim() != 2:
            continue
        t = t.detach()
        return x, (t if ws == o + i else t.t()), None, w, None
    return None


def _fetch(gm: fx.GraphModule, target: str) -> torch.Tensor:
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _layer_name(target: str) -> str:
    """`fc.weight` → `fc`; `attn.in_proj_weight` → `attn.in_proj` (nn.MultiheadAttention's
    q_proj_weight, k_proj_weight, … likewise)."""
    for suffix in (".weight", "_weight"):
        if target.endswith(suffix) and len(target) > len(suffix):
            return target[: -len(suffix)]
    return target


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


# --- what fxopt did not see ----------------------------------------------------------------------

# ops that multiply by a weight: a parameter reaching one of them outside a site is reported
CONTRACTIONS = {"linear", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d",
                "conv_transpose3d", "convolution", "_convolution", "matmul", "mm", "bmm", "addmm", "baddbmm",
                "addbmm", "einsum", "mv", "addmv", "bilinear", "tensordot", "_int_mm",
                "_native_multi_head_attention", "_transformer_encoder_layer_fwd", "multi_head_attention_forward",
                "lstm", "gru", "rnn_tanh",
                "rnn_relu", "lstm_cell", "gru_cell", "rnn_tanh_cell", "rnn_relu_cell"}
# ops that only move, cast or select a weight's values on its way to a contraction
PASSTHROUGH = {"t", "transpose", "permute", "view", "reshape", "unsqueeze", "squeeze", "expand", "contiguous",
               "getitem", "split", "split_with_sizes", "chunk", "slice", "narrow", "to", "type", "float", "half",
               "bfloat16", "flatten", "unflatten", "numpy_T", "T", "_to_copy", "clone", "detach", "alias", "select"}


def op_name(node: fx.Node) -> str:
    """`linear` for F.linear / torch._C._nn.linear / aten.linear.default; the method's name for
    call_method nodes."""
    if node.op == "call_method":
        return node.target
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.name.split("::")[-1]
    if target is getattr:
        return str(node.args[1])
    return getattr(target, "__name__", str(target))


def unseen(gm: fx.GraphModule, sites: list[Site], opaque: dict[str, str] | None = None) -> list[dict[str, str]]:
    """Parameters that reach a matmul-like op (through views, transposes, splits) or sit inside a
    module fxopt cannot open, without being read by any site: what a rule cannot reach. `opaque`
    gives, per module path, why it stayed closed."""
    seen = {p for site in sites for p in site.params}
    site_nodes = {n for site in sites for n in site.nodes}
    found: dict[str, dict[str, str]] = {}
    for node in gm.graph.nodes:
        if node in site_nodes:
            continue
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
                continue  # a lookup, not a product
            why = (opaque or {}).get(node.target)
            for name, p in module.named_parameters():
                full = f"{node.target}.{name}"
                if p.dim() >= 2 and full not in seen:
                    found.setdefault(full, {"param": full, "node": node.name, "op": type(module).__name__,
                                            "reason": f"inside {type(module).__name__} `{node.target}`, which fxopt "
                                                      f"does not open" + (f" ({why})" if why else "")})
        elif node.op in ("call_function", "call_method") and op_name(node) in CONTRACTIONS:
            for arg in node.all_input_nodes:
                target = _param_behind(arg)
                if target is not None and target not in seen and _fetch(gm, target).dim() >= 2:
                    found.setdefault(target, {"param": target, "node": node.name, "op": op_name(node),
                                              "reason": f"read by `{op_name(node)}` ({node.name}) in a form "
                                                        "fxopt does not rewrite"})
    return list(found.values())


def _param_behind(node: fx.Node) -> str | None:
    """The get_attr target reached from `node` going back through PASSTHROUGH ops (their first
    argument is the data; the others are sizes, dims or indices)."""
    while isinstance(node, fx.Node):
        if node.op == "get_attr":
            return node.target
        if node.op not in ("call_function", "call_method") or op_name(node) not in PASSTHROUGH or not node.args:
            return None
        node = node.args[0]
    return None


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


RESHAPES = {"view", "reshape", "unflatten", "contiguous", "_unsafe_view", "squeeze", "unsqueeze"}


def _consumers(node: fx.Node) -> list[fx.Node]:
    """The users of `node`, looking through reshapes that keep its last dimension (Conv1D's
    `x.view(size_out)` after its addmm is part of the layer, not a consumer)."""
    out = []
    last = node.meta.get("tensor_meta").shape[-1] if node.meta.get("tensor_meta") is not None else None
    for user in node.users:
        meta = user.meta.get("tensor_meta")
        if user.op in ("call_function", "call_method") and op_name(user) in RESHAPES and meta is not None \
                and last is not None and len(meta.shape) and meta.shape[-1] == last:
            out += _consumers(user)
        else:
            out.append(user)
    return out


def feeds_mismatch(site: Site, kinds: tuple[str, ...]) -> str | None:
    """Why the site's output does not feed only consumers of these kinds, or None."""
    users = _consumers(site.output)
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
