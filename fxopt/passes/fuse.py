"""The fuse pass: pointwise chains after a substitute become that substitute's kernel epilogue.

For every substitute that can run an epilogue (it has `epilogue_capacity(steps)` and
`with_epilogue(steps)`: `KronLinear` takes any chain, `PackedBinaryLinear` one activation) the
pass follows its output through the nodes that are its only user, one after another, as long as
each is a step the epilogue generator knows (fxopt.codegen.epilogue):

    bias add, scaling, residual add, sub, div     operator.add/…, torch.add/…, Tensor.add/…, aten.add.Tensor/…
    relu, gelu (exact), silu, sigmoid, tanh      functions, methods, aten ops, and nn.ReLU/GELU/SiLU/…
    clamp (min and/or max numbers)               torch.clamp, Tensor.clamp, clamp_min/clamp_max, aten.clamp

(the aten spellings are what graphs from the torch.export fallback of `trace` hold).

The other operand of a binary step is a number (baked into the generated code) or a tensor
node that broadcasts to the output without changing its shape or dtype (passed to the kernel as
an extra, up to MAX_EXTRAS). The chain ends at the first node that is not such a step, that has
other users, or that would change the output's shape or dtype; that node stays in the graph. The
absorbed nodes go; the substitute's call takes the extras after its input and carries the chain
(`module.epilogue`), so on a GPU it runs inside the kernel and elsewhere as the same torch ops.

    gm, records = fuse(gm)     # records: [{"target", "steps", "nodes"}], one per fused chain
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import torch
from torch import fx

from ..codegen import epilogue as ep
from ..substitutes import Substitute

# Lookups built from the one table of steps (codegen.epilogue): spelling → step name.
_UNARY_FUNCTIONS = {f: name for name, p in ep.UNARY.items() for f in p.functions}
_UNARY_METHODS = {m: name for name, p in ep.UNARY.items() for m in p.methods}
_UNARY_MODULES = {m: name for name, p in ep.UNARY.items() for m in p.modules}
_BINARY_FUNCTIONS = {f: name for name, p in ep.BINARY.items() for f in p.functions}
_BINARY_METHODS = {m: name for name, p in ep.BINARY.items() for m in p.methods}
_CLAMPS = {f: name for name, (functions, _) in ep.CLAMPS.items() for f in functions}
_HARMLESS_KWARGS = {"inplace"}  # F.relu(x, inplace=True) computes what F.relu(x) does


def fuse(gm: fx.GraphModule) -> tuple[fx.GraphModule, list[dict[str, Any]]]:
    """Fold each fusable substitute's pointwise chain into it (see the module docstring)."""
    records, erased = [], set()
    calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")  # module → its call sites
    for node in list(gm.graph.nodes):
        if node in erased or node.op != "call_module":
            continue
        module = gm.get_submodule(node.target)
        if not isinstance(module, Substitute):
            continue
        if calls[node.target] != 1:
            continue  # a module called twice cannot carry one call's chain
        steps, extras, chain = _follow(gm, node)
        taken = module.epilogue_capacity(steps)
        steps, chain = steps[:taken], chain[:taken]
        extras = extras[:max(0, ep.extras_used(steps) - (len(node.args) - 1))]
        if not chain:
            continue
        module = module.with_epilogue(steps)
        gm.set_submodule(node.target, module)
        last = chain[-1]
        with gm.graph.inserting_before(last):
            fused = gm.graph.call_module(node.target, (*node.args, *extras))
        fused.meta = dict(last.meta)
        last.replace_all_uses_with(fused)
        for n in reversed([node, *chain]):
            gm.graph.erase_node(n)
            erased.add(n)
        for n in chain:  # an absorbed nn.ReLU & co. that nothing else calls
            if n.op == "call_module":
                calls[n.target] -= 1
                if not calls[n.target]:
                    gm.delete_submodule(n.target)
        records.append({"target": node.target, "steps": [list(s) for s in steps],
                        "nodes": [n.name for n in chain]})
    gm.graph.lint()
    gm.recompile()
    return gm, records


def _follow(gm: fx.GraphModule, start: fx.Node) -> tuple[tuple, list[fx.Node], list[fx.Node]]:
    """The steps, extra tensor nodes and absorbed nodes of the chain after `start`."""
    meta = start.meta.get("tensor_meta")
    if meta is None:
        return (), [], []
    extras = list(start.args[1:])  # a substitute fused once already keeps its extras
    steps, chain, current = [], [], start
    while len(current.users) == 1:
        user = next(iter(current.users))
        found = _step(gm, user, current)
        if found is None:
            break
        step, operand = found
        out = user.meta.get("tensor_meta")
        if out is None or out.shape != meta.shape or out.dtype != meta.dtype:
            break
        if operand is not None:
            if operand in chain or not _fits(operand, meta):
                break
            if operand not in extras:
                if len(extras) == ep.MAX_EXTRAS:
                    break
                extras.append(operand)
            step = (step[0], extras.index(operand))
        steps.append(step)
        chain.append(user)
        current = user
    return tuple(steps), extras[len(start.args) - 1:], chain


def _fits(operand: fx.Node, out: Any) -> bool:
    """A tensor operand that broadcasts to the output's shape and has its dtype."""
    meta = operand.meta.get("tensor_meta")
    if meta is None or meta.dtype != out.dtype:
        return False
    try:
        return torch.broadcast_shapes(meta.shape, out.shape) == out.shape
    except RuntimeError:
        return False


def _step(gm: fx.GraphModule, node: fx.Node, value: fx.Node) -> tuple[tuple, fx.Node | None] | None:
    """(step, tensor operand or None) when `node` applies an epilogue step to `value`, else None."""
    target, args, kwargs = node.target, node.args, dict(node.kwargs)
    if node.op == "call_module":
        module = gm.get_submodule(target)
        name = _UNARY_MODULES.get(type(module))
        if name is None or args != (value,) or (name == "gelu" and module.approximate != "none"):
            return None
        return (name,), None
    if node.op == "call_function" and target in _UNARY_FUNCTIONS or node.op == "call_method" and target in _UNARY_METHODS:
        name = _UNARY_FUNCTIONS.get(target) if node.op == "call_function" else _UNARY_METHODS[target]
        if name == "gelu" and kwargs.pop("approximate", "none") != "none":
            return None
        if args != (value,) or set(kwargs) - _HARMLESS_KWARGS:
            return None
        return (name,), None
    if node.op == "call_function" and target in _CLAMPS:
        return _clamp(_CLAMPS[target], args, kwargs, value)
    if node.op == "call_method" and target in ep.CLAMPS:
        return _clamp(target, args, kwargs, value)
    if node.op == "call_function" and target in _BINARY_FUNCTIONS or node.op == "call_method" and target in _BINARY_METHODS:
        name = _BINARY_FUNCTIONS.get(target) if node.op == "call_function" else _BINARY_METHODS[target]
        if kwargs or len(args) != 2:  # alpha=, rounding_mode=, out=: not a plain step
            return None
        left, right = args
        if left is value and right is not value:
            other = right
        elif right is value and left is not value:
            name, other = ep.SWAPPED[name], left
        else:
            return None
        if isinstance(other, fx.Node):
            return (name, 0), other
        if _finite_number(other):  # inf/nan stay in the graph: the generated code bakes numbers in
            return (name, float(other)), None
    return None


def _finite_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _clamp(name: str, args: tuple, kwargs: dict, value: fx.Node) -> tuple[tuple, None] | None:
    if not args or args[0] is not value:
        return None
    rest = list(args[1:])
    given = {key: rest.pop(0) if rest else kwargs.pop(key, None) for key in ep.CLAMPS[name][1]}
    bounds = (given.get("min"), given.get("max"))
    if rest or kwargs or bounds == (None, None):
        return None
    if not all(b is None or _finite_number(b) for b in bounds):
        return None
    return ("clamp", *(None if b is None else float(b) for b in bounds)), None
