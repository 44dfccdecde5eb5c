"""fxopt as a `torch.compile` backend, registered under the name "fxopt" (entry point
`torch_dynamo_backends`, so no import of fxopt is needed):

    compiled = torch.compile(model, backend="fxopt", options={"rules": "kron"})
    compiled = torch.compile(model, backend="fxopt",
                             options={"rules": "rules/my.yaml", "inner": "eager", "validate": True})

Options: `rules` (a shipped rule set's name or a path; required), `inner` (what compiles the
rewritten graph: "inductor" by default, "aot_eager" or "eager"), `validate` (log the per-site and
end-to-end figures of the rewrite).

Dynamo hands the backend one graph per captured region (several when the model has graph breaks).
In those graphs parameters are placeholders (`l_self_modules_fc_parameters_weight_`) and layers
are functional calls (`torch._C._nn.linear`, `torch.conv2d`). For each graph the backend

1. turns every parameter placeholder into a constant attribute under the layer's qualified name
   (read from the placeholder's Dynamo source, `L['self']._modules['fc']._parameters['weight']`
   → `fc.weight`), so that rules match names as they do on `fxopt optimize`;
2. runs the same pipeline as `fxopt optimize` up to the rewritten graph (trace, match, build,
   validate with rollback, gate, substitute, cleanup, freeze) on the graph's real inputs;
3. hands the rewritten graph to the inner compiler, and returns a function that takes Dynamo's
   full argument list and passes on the non-parameter ones.

A graph in which no rule claims a site goes to the inner compiler untouched.

Inference (no parameter requires grad, or grad mode is off): the substitutes are built once from
the parameters' values when the graph is compiled and are constants from then on.

Training (grad mode on and some parameter requires grad, e.g. `loss.backward()` after a compiled
forward): the optimizer holds the model's own parameters, so those are what the rewritten graph
must train. Every parameter that survives the rewrite under its name (layers no rule claimed, sites
rolled back, substitutes that keep the original's parameters, such as wta_hash's `weight`) is
the user's own Parameter object inside the rewritten graph, and gets its gradient; substitutes stay
in their training form (nothing is frozen). A substitute that replaces a parameter which requires
grad by parameters of its own (kron's A and B, binary's latent weights) would silently stop that
layer from training, so the backend refuses with an error naming the parameter and the site:
freeze that layer (`requires_grad_(False)`: its substitute is then a constant, as in inference),
leave the site out of the rules, or rewrite with `fxopt.optimize` and train the returned model,
whose parameters are the substitutes'.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import fx, nn

from . import rules as rules_mod
from .errors import FxoptError

log = logging.getLogger("fxopt")
INNER = ("inductor", "aot_eager", "eager")
_SOURCE_PART = re.compile(r"\._(?:modules|parameters|buffers)\['([^']+)'\]")


@dataclass(frozen=True)
class Options:
    rules: Any  # a shipped rule set's name, a path, or a parsed RuleSet
    inner: str = "inductor"
    validate: bool = False

    @classmethod
    def parse(cls, options: dict[str, Any] | None) -> "Options":
        options = dict(options or {})
        unknown = set(options) - {"rules", "inner", "validate"}
        if unknown:
            raise FxoptError(f"fxopt backend: unknown option(s) {', '.join(sorted(unknown))} "
                             "(known: rules, inner, validate)")
        if "rules" not in options:
            raise FxoptError('fxopt backend: options={"rules": ...} is required (a shipped rule set or a path)')
        inner = options.get("inner", "inductor")
        if inner not in INNER:
            raise FxoptError(f"fxopt backend: inner={inner!r}; expected one of {', '.join(INNER)}")
        return cls(options["rules"], inner, bool(options.get("validate", False)))


def qualified_name(node: fx.Node) -> str | None:
    """`fc.weight` for a placeholder whose Dynamo source is a module's parameter or buffer."""
    arg = node.meta.get("grapharg")
    source = getattr(getattr(arg, "source", None), "name", None)
    source = source() if callable(source) else source
    parts = _SOURCE_PART.findall(source or "")
    return ".".join(parts) if parts else None


def constants_graph(gm: fx.GraphModule, example_inputs: list
                    ) -> tuple[fx.GraphModule, list[int], dict[str, nn.Parameter]]:
    """A copy of `gm` whose parameter placeholders are attributes under their qualified names
    (sharing the parameters' storage, without grad); returns it, the positions of the
    placeholders it still takes, and the user's parameters by qualified name."""
    root = nn.Module()
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    keep, params = [], {}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for i, (node, value) in enumerate(zip(placeholders, example_inputs)):
        name = qualified_name(node) if isinstance(value, nn.Parameter) else None
        if name is None:
            keep.append(i)
            env[node] = graph.placeholder(node.target)
            continue
        _set_attr(root, name, nn.Parameter(value.detach(), requires_grad=False))
        params[name] = value
        env[node] = graph.get_attr(name)
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            env[node] = graph.node_copy(node, lambda n: env[n])
    for name, module in gm.named_children():  # call_module nodes (rare in Dynamo graphs) keep their modules
        if not hasattr(root, name):
            root.add_module(name, module)
    out = fx.GraphModule(root, graph, gm.__class__.__name__)
    return out, keep, params


def _set_attr(root: nn.Module, path: str, param: nn.Parameter) -> None:
    *owners, attr = path.split(".")
    module = root
    for part in owners:
        if not hasattr(module, part):
            module.add_module(part, nn.Module())
        module = getattr(module, part)
    module.register_parameter(attr, param)


def tie_parameters(model: fx.GraphModule, params: dict[str, nn.Parameter], result) -> None:
    """Training: put the user's own Parameter objects into the rewritten `model` wherever a
    parameter of that name and shape survived; the substitutes' own parameters become constants.
    A parameter that requires grad and did not survive is an error (see the module docstring)."""
    own = dict(model.named_parameters())
    for name, p in params.items():
        if p.requires_grad and (name not in own or own[name].shape != p.shape):
            raise FxoptError(_lost(name, params, result))
    for p in own.values():
        p.requires_grad_(False)
    for name, p in params.items():
        if name in own:
            _set_attr(model, name, p)


def _lost(name: str, params: dict[str, nn.Parameter], result) -> str:
    for site, module in result.substitutes:
        if name in site.params:
            break
    else:
        return f"fxopt backend: training: parameter {name} requires grad but is gone from the rewritten graph"
    rec = next(s for s in result.report["sites"] if s["key"] == site.key)
    new = ", ".join(n for n, _ in module.named_parameters() if f"{site.key}.{n}" not in params) or "none"
    return (f"fxopt backend: training: {name} requires grad, but the {rec['substitute']} substitute at site "
            f"{site.key} replaces it with parameters of its own ({new}) that your optimizer does not hold; "
            f"freeze that layer (requires_grad_(False)), leave the site out of the rules, or rewrite with "
            f"fxopt.optimize and train the returned model")


def _inner(name: str) -> Callable:
    if name == "eager":
        return lambda gm, inputs: gm.forward
    from torch._dynamo.backends.registry import lookup_backend

    return lookup_backend(name)


def fxopt_backend(gm: fx.GraphModule, example_inputs: list, *, options: dict | None = None,
                  mode: str | None = None) -> Callable:
    """The `torch.compile` backend (see the module docstring)."""
    from .pipeline import rewrite
    from .report import print_summary

    opts = Options.parse(options)
    ruleset = rules_mod.load(opts.rules)
    inner = _inner(opts.inner)
    const_gm, keep, params = constants_graph(gm, example_inputs)
    training = torch.is_grad_enabled() and any(p.requires_grad for p in params.values())
    inputs = [example_inputs[i] for i in keep]
    if not keep or not all(isinstance(t, torch.Tensor) for t in inputs):
        log.info("fxopt backend: graph with non-tensor or no inputs; left to %s", opts.inner)
        return inner(gm, example_inputs)
    # the rewrite runs the graph several times (validation); on copies, so that buffers it updates
    # in place (a training-mode BatchNorm's running statistics) are the user's only when the model runs
    probe = tuple(t.detach().clone() for t in inputs)
    with torch.no_grad():
        result = rewrite(const_gm, probe, ruleset, source=f"dynamo graph {gm.__class__.__name__}", training=training)
    if opts.validate:
        print_summary(result.report)
    applied = result.report["totals"]["applied"]
    log.info("fxopt backend: %d site(s) rewritten; inner compiler %s%s", applied, opts.inner,
             " (training)" if training else "")
    if not applied:
        return inner(gm, example_inputs)
    if training:
        tie_parameters(result.model, params, result)
    result.model.train(training)  # substitutes that behave differently in training (binary, wta_hash)
    compiled = inner(result.model, inputs)

    def run(*args):
        return compiled(*[args[i] for i in keep])

    return run
