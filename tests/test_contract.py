"""The substitute contract (fxopt.substitutes, docs/architecture.md), checked for every registered
technique: what a new technique must satisfy before the pipeline, passes and validation use it."""

from __future__ import annotations

import pkgutil

import pytest
import torch
from torch import nn

import fxopt.substitutes as subs
from fxopt import rules
from fxopt.flops import dense_flops

# One layer per op the techniques replace, sized so that every technique builds at its defaults
# (wta_hash wants over 4 × 128 outputs; kron's default 32× compression wants a few thousand weights).
LAYERS = {
    "linear": lambda: nn.Linear(256, 768),
    "conv1d": lambda: nn.Conv1d(32, 64, 5, padding=2),
    "conv2d": lambda: nn.Conv2d(32, 64, 3, padding=1),
}
INPUTS = {"linear": (4, 256), "conv1d": (2, 32, 24), "conv2d": (2, 32, 12, 12)}
CASES = [(name, op) for name in subs.names() for op in subs.get(name).ops]


def layer_and_input(op: str, seed: int = 0):
    torch.manual_seed(seed)
    return LAYERS[op]().eval(), torch.randn(*INPUTS[op])


def test_every_file_in_the_package_registers_a_technique():
    files = {m.name for m in pkgutil.iter_modules(subs.__path__)}
    assert set(subs.names()) == files


@pytest.mark.parametrize("name,op", CASES)
def test_exact_settings_reproduce_the_original_layer(name, op):
    spec = subs.get(name)
    if spec.exact is None:
        pytest.skip(f"{name}: no setting that build accepts is exact")
    layer, x = layer_and_input(op)
    if spec.representable is not None:
        spec.representable(layer)
    sub = spec.build(layer, spec.parse_params(spec.exact(layer))).eval()
    assert isinstance(sub, subs.Substitute)
    with torch.no_grad():
        want, got = layer(x), sub(x)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


@pytest.mark.parametrize("name,op", CASES)
def test_deployable_form_computes_what_the_training_form_does_in_eval(name, op):
    spec = subs.get(name)
    layer, x = layer_and_input(op, seed=1)
    sub = spec.build(layer, spec.parse_params({})).eval()
    deployed = sub.deployable().eval()
    with torch.no_grad():
        want, got = sub(x), deployed(x)
    finite = torch.isfinite(want)  # wta_hash fills the outputs it does not compute with −inf
    assert torch.equal(finite, torch.isfinite(got))
    assert torch.allclose(got[finite], want[finite], rtol=1e-5, atol=1e-5 * want[finite].abs().max().item())


@pytest.mark.parametrize("name,op", CASES)
def test_flops_at_the_defaults(name, op):
    spec = subs.get(name)
    layer, x = layer_and_input(op, seed=2)
    sub = spec.build(layer, spec.parse_params({}))
    with torch.no_grad():
        out_shape = layer(x).shape
    dense = dense_flops(layer, x.shape, out_shape)
    count = sub.flops(x.shape, out_shape)
    if spec.saves_flops:
        assert count is not None and 0 < count <= dense
    else:
        assert count is None or count == dense


LADDER_START = {"lowrank": {"max_flops_ratio": 0.0625}}  # its default (0.5) is one step from full rank


@pytest.mark.parametrize("name,op", [(n, op) for n, op in CASES if subs.get(n).relax is not None])
def test_each_rung_of_the_ladder_holds_more_and_errs_less(name, op):
    """`relax` (the accuracy budget's ladder): each step builds a layer with more parameters and
    an output no further from the original's, from the technique's defaults up to where its
    builds stop saving parameters, stop growing (the pipeline's Ladder ends there) or decline."""
    spec = subs.get(name)
    layer, x = layer_and_input(op, seed=4)
    dense = sum(p.numel() for p in layer.parameters())
    with torch.no_grad():
        want = layer(x)
    params, sizes, errors = spec.parse_params(LADDER_START.get(name, {})), [], []
    while params is not None and len(sizes) < 12:
        try:
            sub = spec.build(layer, params).eval()
        except subs.Decline:
            break
        size = sum(p.numel() for p in sub.parameters())
        if size >= dense or (sizes and size == sizes[-1]):
            break
        with torch.no_grad():
            errors.append(((sub(x) - want).norm() / want.norm()).item())
        sizes.append(size)
        params = spec.relax(params)
    assert len(sizes) >= 2, f"{name}: the ladder has no step above the defaults on a {op} layer"
    assert sizes == sorted(set(sizes)), sizes
    assert all(b <= a + 1e-6 for a, b in zip(errors, errors[1:])), errors


@pytest.mark.parametrize("name", subs.names())
def test_a_rule_with_the_defaults_loads_and_a_shipped_rule_file_exists(name):
    spec = subs.get(name)
    ruleset = rules.parse(f"version: 1\nrules:\n  - substitute: {name}\n", "defaults.yaml")
    assert ruleset.rules[0].param_dict == {p.name: p.default for p in spec.params}
    assert ruleset.rules[0].match.ops == spec.ops
    shipped = rules.load(name)
    assert {r.substitute for r in shipped.rules} == {name}


@pytest.mark.parametrize("name", subs.names())
def test_every_parameter_has_one_default_and_a_parser_that_accepts_it(name):
    spec = subs.get(name)
    for p in spec.params:
        assert p.default is not subs._UNSET, p.name
        if p.default is not None and not (isinstance(p.default, float) and p.default == float("-inf")):
            assert p.parse(p.default) == p.default, p.name


def test_a_default_written_twice_is_refused():
    with pytest.raises(ValueError, match="written twice"):
        subs.SubstituteSpec(name="x", summary="", ops=("linear",), build=lambda m, p: m,
                            params=(subs.Param("rank", "", subs.positive_int, default=4),),
                            defaults=lambda layer, rank=4: None)
    with pytest.raises(ValueError, match="no default"):
        subs.SubstituteSpec(name="x", summary="", ops=("linear",), build=lambda m, p: m,
                            params=(subs.Param("rank", "", subs.positive_int),))


@pytest.mark.parametrize("parse,good,bad", [
    (subs.number_in(0.0, 1.0), ["5e-1", 0.5], [0, 1, "x", True, float("nan")]),
    (subs.number_in(1.0, low_open=False), [1, 2.5], [0.99]),
    (subs.int_in(1, 8), [1, 8], [0, 9, 2.0, True]),
    (subs.float_above(0.0), ["1e-3", 3], [0, -1, float("inf")]),
])
def test_shared_parsers(parse, good, bad):
    for value in good:
        parse(value)
    for value in bad:
        with pytest.raises(ValueError):
            parse(value)
