"""PyTorch's attention modules, opened up so that their projections are sites.

`symbolic_trace` keeps every module of `torch.nn` as one opaque `call_module` node, and
`nn.MultiheadAttention`, `nn.TransformerEncoderLayer`/`DecoderLayer`, `nn.TransformerEncoder`/
`Decoder` and `nn.Transformer` hold linear layers inside: the packed q/k/v input projection (one
3E × E parameter, `in_proj_weight`), or separate `q/k/v_proj_weight` when `kdim`/`vdim` differ,
the output projection and the feed-forward linears. In eval mode they also take fused fast paths
(`_native_multi_head_attention`, `_transformer_encoder_layer_fwd`) that hold every weight as an
argument of one op.

`expand` replaces each such call by the graph PyTorch's own non-fused path computes for it, taken
with `torch.export` on the module alone (on the call's example values, every dimension dynamic
where the module allows), so it is PyTorch's code, not ours, whatever the module's options
(masks, `need_weights`, `batch_first`, `kdim`/`vdim`, `add_zero_attn`). The projections then
appear as `aten.linear` on the module's parameters, which `match` finds as sites named after the
module (`layers.0.self_attn.in_proj`, `layers.0.self_attn.out_proj`, `layers.0.linear1`).

Each expanded call is a `Region`. `collapse` (fxopt/passes/collapse.py) puts back the original
call, fast path included, wherever no site inside a region was rewritten, so a model only gives up
the fused path in the modules fxopt actually changed.

    >>> gm, regions = expand(gm, values)        # doctest: +SKIP  (values: node → example value)
"""

from __future__ import annotations

import operator
import types
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from .errors import first_line

ATTENTION_MODULES = (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer,
                     nn.TransformerEncoder, nn.TransformerDecoder, nn.Transformer)


@dataclass
class Region:
    """The nodes that one expanded module call became, and what it takes to call it again."""

    path: str  # the module's qualified name (for a function call: the module owning its weights)
    module_type: str  # or the function's name
    op: str  # call_module | call_function
    target: Any  # what the call calls
    nodes: list[fx.Node]  # in graph order; the first ones are its `entries`
    entries: list[fx.Node]  # per distinct tensor the call takes: a `region_input` node (a get_attr as is)
    slots: list[tuple[str, Any]]  # per argument leaf: ("input", entry index) or ("const", value)
    spec: Any  # pytree spec of the call's (args, kwargs)
    outputs: list[fx.Node | None]  # flattened outputs, in the module's output order
    out_spec: Any  # pytree spec of the module's output

    def call_args(self) -> tuple[tuple, dict]:
        """The call's arguments as they are now (later passes may have replaced an input)."""
        return _arguments(self.slots, self.spec, [e if e.op == "get_attr" else e.args[0] for e in self.entries])


def _arguments(slots: list[tuple[str, Any]], spec, inputs: list) -> tuple[tuple, dict]:
    """(args, kwargs) of a call from its argument slots, the inputs filled in."""
    return tree_unflatten([inputs[v] if kind == "input" else v for kind, v in slots], spec)


def region_input(x):
    """Identity: marks where a region reads one of its inputs, so that the node it reads stays
    known through later rewrites (fx updates this node's argument when that node is replaced)."""
    return x


@dataclass
class Unexpanded:
    """An attention module call left opaque, and why."""

    path: str
    module_type: str
    reason: str


# functions that hold the projection weights as arguments: Dynamo's graphs (the torch.compile
# backend) keep nn.MultiheadAttention as one call of this
ATTENTION_FUNCTIONS = (F.multi_head_attention_forward,)


def expandable(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in ATTENTION_FUNCTIONS
    return node.op == "call_module" and isinstance(gm.get_submodule(node.target), ATTENTION_MODULES)


def _callee(gm: fx.GraphModule, node: fx.Node):
    """(what runs, its name for reports, its kind's name)"""
    if node.op == "call_function":
        name = _weight_owner(node) or node.name
        return node.target, name, node.target.__name__
    module = gm.get_submodule(node.target)
    return module, node.target, type(module).__name__


def _weight_owner(node: fx.Node) -> str | None:
    """The module path of the first parameter a function call reads (`attn.in_proj_weight` → `attn`)."""
    for arg in node.all_input_nodes:
        if arg.op == "get_attr" and "." in arg.target:
            return arg.target.rpartition(".")[0]
    return None


def expand(gm: fx.GraphModule, values: dict[fx.Node, Any]) -> tuple[list[Region], list[Unexpanded]]:
    """Replace every attention-module call of `gm` (in place) by the graph of its non-fused path.

    `values` holds the example value of every node the calls read (a shape-propagation run).
    Calls of one configuration on inputs of one shape share one export."""
    regions, kept = [], []
    programs: dict[Any, torch.export.ExportedProgram] = {}
    for node in [n for n in gm.graph.nodes if expandable(gm, n)]:
        fn, name, kind = _callee(gm, node)
        call = _Call(fn, node.args, node.kwargs)
        key = (_config_key(fn) if isinstance(fn, nn.Module) else fn, call.signature(values))
        try:
            if key not in programs:
                programs[key] = call.export(values)
            regions.append(_inline(gm, node, programs[key], call, values, name))
        except _Unsupported as exc:
            kept.append(Unexpanded(name, kind, str(exc)))
        except Exception as exc:  # torch.export cannot take it: the call stays opaque, and is reported
            kept.append(Unexpanded(name, kind, f"torch.export: {first_line(exc)}"))
    gm.graph.lint()
    gm.recompile()
    return regions, kept


class _Unsupported(Exception):
    pass


class _Call(nn.Module):
    """One call of an attention module (or function) with its tensors as the only inputs: the
    same tensor passed twice (self-attention: query is key is value) stays one input, so PyTorch
    takes its single packed projection instead of slicing the weight three times. A function's
    weights are inputs too, with their shapes fixed."""

    def __init__(self, fn, args: tuple, kwargs: dict):
        super().__init__()
        if isinstance(fn, nn.Module):
            self.module = fn
        else:
            self.function = fn
        leaves, self.spec = tree_flatten((args, kwargs))
        self.inputs: list[fx.Node] = []  # distinct tensor nodes, in first-use order
        self.slots: list[Any] = []  # per leaf: ("input", i) or ("const", value)
        for leaf in leaves:
            if isinstance(leaf, fx.Node):
                if leaf not in self.inputs:
                    self.inputs.append(leaf)
                self.slots.append(("input", self.inputs.index(leaf)))
            else:
                self.slots.append(("const", leaf))

    def forward(self, *tensors):
        args, kwargs = _arguments(self.slots, self.spec, list(tensors))
        return (self.module if hasattr(self, "module") else self.function)(*args, **kwargs)

    def signature(self, values: dict[fx.Node, Any]) -> tuple:
        metas = tuple((tuple(values[n].shape), values[n].dtype) if isinstance(values[n], torch.Tensor)
                      else ("value", repr(values[n])) for n in self.inputs)
        return metas, tuple((kind, v if kind == "input" else repr(v)) for kind, v in self.slots), repr(self.spec)

    def export(self, values: dict[fx.Node, Any]) -> torch.export.ExportedProgram:
        example = tuple(values[n] for n in self.inputs)
        if not all(isinstance(t, torch.Tensor) for t in example):
            raise _Unsupported("an argument is not a tensor")
        dynamic = tuple(None if n.op == "get_attr" else {d: torch.export.Dim.AUTO for d in range(t.dim())}
                        for n, t in zip(self.inputs, example))
        # inside torch.compile's backend: keep Dynamo's own guards apart
        with torch._guards.tracing(None), inference_encoders(self):
            return torch.export.export(self, example, strict=False, dynamic_shapes=(dynamic,))


def encoder_forward(encoder: nn.TransformerEncoder, src: torch.Tensor, mask: torch.Tensor | None = None,
                    src_key_padding_mask: torch.Tensor | None = None, is_causal: bool | None = None) -> torch.Tensor:
    """What `nn.TransformerEncoder` computes in inference, written without its fast path.

    In eval mode, under `no_grad`, with a key-padding mask and no attention mask, PyTorch runs
    the layers on a nested tensor of the unpadded tokens and pads the result with zeros (when
    the padding is at the end of each row, which it checks on the data). The tokens that are
    kept see the same keys either way; the padded positions come out as zeros here too, so the
    expanded graph computes what the user's model computes in inference. `is_causal` is only a
    hint to PyTorch (the mask is applied either way), so an undecided one is taken as False."""
    layers = list(encoder.layers)
    nested = (torch.backends.mha.get_fastpath_enabled() and getattr(encoder, "use_nested_tensor", False)
              and not layers[0].training and src.dim() == 3 and src_key_padding_mask is not None
              and mask is None)
    output = src
    for layer in layers:
        output = layer(output, src_mask=mask, is_causal=bool(is_causal), src_key_padding_mask=src_key_padding_mask)
    if nested:
        padded = src_key_padding_mask.bool() if src_key_padding_mask.dtype == torch.bool \
            else src_key_padding_mask != 0  # an additive mask: −inf where padded
        keep = (~padded).int()
        aligned = (keep[:, 1:] <= keep[:, :-1]).all() if getattr(encoder, "mask_check", True) else True
        output = output.masked_fill(padded.unsqueeze(-1) & aligned, 0.0)
    if encoder.norm is not None:
        output = encoder.norm(output)
    return output


@contextmanager
def inference_encoders(model: nn.Module):
    """Each `nn.TransformerEncoder` in `model` (itself included) computes `encoder_forward` while
    inside: for torch.export, which never takes PyTorch's fast paths, of a whole model or of one
    call (an `nn.Transformer` holds an encoder too)."""
    encoders = [m for m in model.modules() if type(m) is nn.TransformerEncoder]
    for m in encoders:
        m.forward = types.MethodType(encoder_forward, m)
    try:
        yield model
    finally:
        for m in encoders:
            del m.forward  # the class's own forward again


def _config_key(module: nn.Module) -> tuple:
    """What decides the graph of a module's non-fused path: types, options and parameter
    shapes of it and its submodules (not the parameter values)."""
    parts = []
    for name, m in module.named_modules():
        options = tuple(sorted((k, _plain(v)) for k, v in vars(m).items()
                               if not k.startswith("_") and _plain(v) is not None))
        tensors = tuple((k, None if t is None else (tuple(t.shape), t.dtype))
                        for k, t in list(m._parameters.items()) + list(m._buffers.items()))
        parts.append((name, type(m).__qualname__, m.training, options, tensors))
    return tuple(parts)


def _plain(value):
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if callable(value):  # TransformerEncoderLayer.activation: F.relu / F.gelu or a module
        return getattr(value, "__qualname__", type(value).__qualname__)
    return None


def _inline(gm: fx.GraphModule, node: fx.Node, program: torch.export.ExportedProgram, call: _Call,
            values: dict[fx.Node, Any], name: str) -> Region:
    """Copy `program`'s graph into `gm` in place of `node`; its parameters become `get_attr`s of
    the module's own parameters (so they keep their names and are shared with the module)."""
    sig = program.graph_signature
    if sig.inputs_to_lifted_tensor_constants or sig.inputs_to_lifted_custom_objs or sig.buffers_to_mutate:
        raise _Unsupported("its graph holds tensor constants or mutates buffers")
    owned = {**sig.inputs_to_parameters, **sig.inputs_to_buffers}
    env: dict[fx.Node, Any] = {}
    graph = gm.graph
    made: list[fx.Node] = []
    with graph.inserting_before(node):
        # a parameter is read as it is (matching needs the get_attr); anything else through a marker
        entries = [inp if inp.op == "get_attr" else graph.call_function(region_input, (inp,)) for inp in call.inputs]
        made += [e for e in entries if e.op != "get_attr"]
        users = iter(entries)
        for n in program.graph.nodes:
            if n.op == "placeholder":
                if n.name in owned:  # "module.in_proj_weight" → "<path>.in_proj_weight"
                    env[n] = graph.get_attr(f"{name}.{owned[n.name].removeprefix('module.')}")
                    made.append(env[n])
                else:
                    env[n] = next(users)
            elif n.op == "output":
                outputs = [env.get(o) if isinstance(o, fx.Node) else o for o in n.args[0]]
            else:
                env[n] = graph.node_copy(n, lambda a: env[a])
                env[n].meta = {}
                made.append(env[n])
    spec = program.call_spec.out_spec
    _rewire(graph, node, outputs, spec, made, values)
    graph.erase_node(node)
    kind = type(call.module).__name__ if hasattr(call, "module") else call.function.__name__
    return Region(name, kind, node.op, node.target, made, entries, call.slots, call.spec, outputs, spec)


def _rewire(graph: fx.Graph, node: fx.Node, outputs: list, spec, made: list[fx.Node],
            values: dict[fx.Node, Any]) -> None:
    """Send each user of the module call to the copied graph's matching output (and carry the
    example values that later calls read over to the nodes that now produce them)."""
    if spec.is_leaf():  # one tensor out
        node.replace_all_uses_with(outputs[0])
        if node in values:
            values[outputs[0]] = values[node]
        return
    for user in list(node.users):
        if user.op == "call_function" and user.target is operator.getitem and isinstance(user.args[1], int):
            out = outputs[user.args[1]]
            if out is None:  # need_weights=False: the weights are None and must not be used
                if user.users:
                    raise _Unsupported("a None output of the module is used")
                graph.erase_node(user)
            else:
                user.replace_all_uses_with(out)
                if user in values:
                    values[out] = values[user]
                graph.erase_node(user)
        else:  # the tuple itself is used: rebuild it
            with graph.inserting_before(user):
                packed = graph.call_function(tuple, (list(outputs),))
            made.append(packed)
            user.replace_input_with(node, packed)


def collapse_region(gm: fx.GraphModule, region: Region) -> None:
    """Put back the module call that `region` replaced (its nodes must be untouched)."""
    graph = gm.graph
    inside = set(region.nodes)
    args, kwargs = region.call_args()
    with graph.inserting_before(region.nodes[0]):
        call = graph.create_node(region.op, region.target, args, kwargs)
        if region.out_spec.is_leaf():
            replacements = [call]
        else:
            replacements = [None if o is None else graph.call_function(operator.getitem, (call, i))
                            for i, o in enumerate(region.outputs)]
    for out, new in zip(region.outputs, replacements):
        if isinstance(out, fx.Node):
            out.replace_all_uses_with(new, delete_user_cb=lambda user: user not in inside)
    for n in region.nodes:  # a tuple rebuilt for an outside user now packs getitems of the call
        if n.op == "call_function" and n.target is tuple:
            for user in list(n.users):
                if user not in inside:
                    user.replace_input_with(n, call)
    for n in reversed(region.nodes):
        graph.erase_node(n)


def open_region(gm: fx.GraphModule, region: Region) -> None:
    """Keep `region` expanded for good: its `region_input` markers read their inputs directly."""
    for entry in region.entries:
        if entry.op != "get_attr":
            entry.replace_all_uses_with(entry.args[0])
            gm.graph.erase_node(entry)


__all__ = ["ATTENTION_MODULES", "Region", "Unexpanded", "expand", "expandable", "collapse_region", "open_region",
           "inference_encoders"]
