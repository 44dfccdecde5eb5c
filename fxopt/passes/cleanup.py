"""The cleanup pass: drop dead nodes, and parameters and submodules no node uses any more.

After a functional site is rewritten, its original weight is still an attribute of the
GraphModule; dropping it is what makes the saved model smaller.

An in-place method or function (`x.add_(1)`, `torch.relu_`) is kept even when nothing reads its
result: it is how a Dynamo graph updates a training-mode BatchNorm's `num_batches_tracked`,
which fx's own dead-code test would drop.
"""

from __future__ import annotations

from torch import fx


def cleanup(gm: fx.GraphModule) -> tuple[fx.GraphModule, list[dict]]:
    gm.graph.eliminate_dead_code(is_impure_node=_impure)
    gm.delete_all_unused_submodules()
    used_attrs = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    used_modules = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    dropped = []
    for kind, named in (("parameter", gm.named_parameters), ("buffer", gm.named_buffers)):
        for name, _ in list(named(remove_duplicate=False)):
            if name in used_attrs or any(name.startswith(m + ".") for m in used_modules):
                continue
            owner, _, attr = name.rpartition(".")
            delattr(gm.get_submodule(owner) if owner else gm, attr)
            dropped.append({"dropped": name, "kind": kind})
    gm.graph.lint()
    gm.recompile()
    return gm, dropped


def live_nodes(graph: fx.Graph) -> set[fx.Node]:
    """The nodes the model's outputs (or an in-place update) depend on: what cleanup keeps."""
    live: set[fx.Node] = set()
    stack = [n for n in graph.nodes if n.op in ("output", "placeholder") or _impure(n)]
    while stack:
        node = stack.pop()
        if node not in live:
            live.add(node)
            stack.extend(node.all_input_nodes)
    return live


def _impure(node: fx.Node) -> bool:
    if node.op in ("call_method", "call_function"):
        name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
        if name.endswith("_") and not name.endswith("__"):
            return True
    return node.is_impure()
