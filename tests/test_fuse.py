"""The fuse pass and generated epilogues: which fx chains after a substitute become its kernel's
epilogue, that the rewritten model computes exactly what it computed before fusing (torch
reference) and what the Triton kernel computes (interpreter on CPU), and the disk cache."""

from __future__ import annotations

import copy
import operator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxopt
from fxopt import rules
from fxopt.codegen import epilogue as ep
from fxopt.codegen import registry

from conftest import needs_triton

ALL_LINEAR = rules.parse("version: 1\nrules:\n  - match: {op: linear}\n    substitute: kron\n"
                         "    params: {compression: 4, max_flops_ratio: null}\n    tolerance: {cosine: 0.0}\n")


class Chains(nn.Module):
    """One linear per kind of chain; `expect` lists what each should fuse into."""

    expect = {
        "a": [["gelu"], ["mul", 0.5], ["add", 0]],          # scaled residual block
        "b": [["relu"], ["clamp", None, 6.0]],              # relu6 spelled out, Tensor methods
        "c": [["silu"], ["rsub", 1.0], ["mul", 0]],         # nn.SiLU module, 1 − y, per-channel scale
        "d": [["tanh"], ["add", 2.0], ["rdiv", 0]],         # operand on the left
    }

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.d = (nn.Linear(32, 32) for _ in range(4))
        self.e = nn.Linear(32, 32)  # output read twice: nothing fuses
        self.f = nn.Linear(32, 32)  # tanh-approximate gelu: not the exact form, stays
        self.g = nn.Linear(32, 32)  # an infinite bound: not baked into generated code, stays
        self.act = nn.SiLU()
        self.scale = nn.Parameter(torch.rand(32) + 0.5)

    def forward(self, x):
        h = F.gelu(self.a(x)) * 0.5 + x
        h = self.b(h).relu().clamp(max=6)
        h = torch.mul(1 - self.act(self.c(h)), self.scale)
        h = (h.abs() + 1) / (torch.tanh(self.d(h)) + 2)
        e = self.e(h)
        h = e * e.sigmoid()
        h = torch.clamp(self.g(h), max=float("inf"))
        return F.gelu(self.f(h), approximate="tanh").softmax(-1)


BINARY_LINEAR = rules.parse("version: 1\nrules:\n  - match: {op: linear}\n    substitute: binary\n"
                            "    tolerance: {cosine: 0.0}\n")


def _optimized(model, x, ruleset=ALL_LINEAR):
    return fxopt.optimize(model, (x,), ruleset, time_sites=False)


def test_chains_are_fused_and_the_report_says_which():
    torch.manual_seed(0)
    model, x = Chains().eval(), torch.randn(5, 32)
    result = _optimized(model, x)
    by_key = {s["key"]: s for s in result.report["sites"]}
    assert all(by_key[k]["status"] == "applied" for k in "abcdefg")
    assert {k: by_key[k]["epilogue"] for k in "abcdefg"} == {**Chains.expect, "e": None, "f": None, "g": None}
    gm = result.model
    for key, steps in Chains.expect.items():
        assert gm.get_submodule(key).epilogue == ep.check(steps)
    ops = [n for n in gm.graph.nodes if n.op != "placeholder" and n.op != "output"]
    assert not any(n.op == "call_module" and n.target == "act" for n in ops)  # absorbed, and removed
    assert not hasattr(gm, "act")
    assert any(n.target == "sigmoid" for n in ops) and any(n.target == "softmax" for n in ops)  # not fusable
    with torch.no_grad():
        torch.testing.assert_close(gm(x), _unfused(model, result)(x), rtol=0, atol=0)


def _unfused(model, result):
    """The user's model with the substitutes as validated (before `fuse`): what fusing must not change."""
    unfused = copy.deepcopy(model)
    for site, module in result.substitutes:
        setattr(unfused, site.key, module)
    return unfused


@needs_triton
@pytest.mark.parametrize("ruleset", [ALL_LINEAR, BINARY_LINEAR], ids=["kron", "binary"])
def test_fused_kernels_match_the_unfused_graph(ruleset):
    torch.manual_seed(1)
    model, x = Chains().eval(), torch.randn(3, 32)
    result = _optimized(model, x, ruleset)
    with torch.no_grad():
        expected = result.model(x)
        with registry.use_backend("triton"):
            out = result.model(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


class Untraceable(nn.Module):
    """A shape test in Python: symbolic_trace fails, the torch.export fallback's aten graph is fused."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(32, 32), nn.Linear(32, 32)

    def forward(self, x):
        if x.shape[0] > 1:
            x = x * 1.0
        h = torch.clamp(F.gelu(self.a(x)) * 0.5 + x, min=-3.0)
        return torch.sigmoid(self.b(h)) - h


def test_export_fallback_graphs_fuse_their_aten_chains():
    torch.manual_seed(7)
    model, x = Untraceable().eval(), torch.randn(4, 32)
    result = _optimized(model, x)
    assert result.report["trace"]["method"] == "export"
    assert {s["key"]: s["epilogue"] for s in result.report["sites"]} == {
        "a": [["gelu"], ["mul", 0.5], ["add", 0], ["clamp", -3.0, None]], "b": [["sigmoid"], ["sub", 0]]}
    with torch.no_grad():
        torch.testing.assert_close(result.model(x), _unfused(model, result)(x), rtol=0, atol=0)


class Shapes(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.other = nn.Parameter(torch.randn(4, 3, 16))

    def forward(self, x):  # x: (3, 16); the add broadcasts the output up to (4, 3, 16)
        return torch.relu(self.fc(x) + self.other)


def test_a_step_that_changes_the_output_shape_ends_the_chain():
    torch.manual_seed(2)
    model, x = Shapes().eval(), torch.randn(3, 16)
    result = _optimized(model, x)
    assert result.report["sites"][0]["epilogue"] is None
    with torch.no_grad():
        torch.testing.assert_close(result.model(x), _unfused(model, result)(x))


def test_extras_are_capped_at_max_extras():
    torch.manual_seed(4)
    model, xs = _Residuals().eval(), tuple(torch.randn(2, 16) for _ in range(6))
    result = fxopt.optimize(model, xs, ALL_LINEAR, time_sites=False)
    assert result.report["sites"][0]["epilogue"] == [["add", i] for i in range(ep.MAX_EXTRAS)]
    gm = result.model
    assert [n.target for n in gm.graph.nodes if n.op == "call_function"] == [operator.add]  # the fifth stays
    with torch.no_grad():
        torch.testing.assert_close(gm(*xs), _unfused(model, result)(*xs))


class _Residuals(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(16, 16)

    def forward(self, x, r0, r1, r2, r3, r4):
        return self.layer(x) + r0 + r1 + r2 + r3 + r4


def test_fused_model_saves_and_loads(tmp_path):
    torch.manual_seed(3)
    model, x = Chains().eval(), torch.randn(4, 32)
    result = _optimized(model, x)
    loaded = fxopt.load(result.save(tmp_path / "out"))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), result.model(x))


def test_a_packed_binary_layer_takes_any_chain_into_its_kernel():
    torch.manual_seed(6)
    model, x = Chains().eval(), torch.randn(4, 32)
    result = _optimized(model, x, BINARY_LINEAR)
    by_key = {s["key"]: s for s in result.report["sites"]}
    assert {k: by_key[k]["epilogue"] for k in "abcdefg"} == {**Chains.expect, "e": None, "f": None, "g": None}
    for key, steps in Chains.expect.items():
        fused = result.model.get_submodule(key)
        assert type(fused).__name__ == "PackedBinaryLinear" and fused.epilogue == ep.check(steps)
    assert all(m.epilogue == () for _, m in result.substitutes)  # the validated forms, unfused
    with torch.no_grad():
        torch.testing.assert_close(result.model(x), _unfused(model, result)(x), rtol=0, atol=0)
        torch.testing.assert_close(result.program.module()(x), result.model(x))


# --- generated source: validation, the disk cache, FXOPT_DEBUG ------------------------------------

@pytest.mark.parametrize("steps,message", [
    ([["softmax"]], "step 0"),
    ([["relu"], ["add"]], "step 1"),
    ([["add", 4]], "step 0"),              # past MAX_EXTRAS
    ([["mul", float("nan")]], "step 0"),
    ([["clamp", "low", None]], "step 0"),
])
def test_unknown_or_malformed_steps_are_refused(steps, message):
    with pytest.raises(ValueError, match=message):
        ep.check(steps)


def test_source_is_cached_on_disk_by_its_text_and_printed_in_debug(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FXOPT_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("FXOPT_DEBUG", "1")
    monkeypatch.setattr(ep, "_loaded", {})
    steps = ep.check([["relu"], ["mul", 2.0], ["add", 0]])
    fn = ep.kernel_function(steps)
    files = list((tmp_path / "epilogues").glob("epilogue_*.py"))
    assert len(files) == 1 and files[0].read_text() == ep.source(steps)
    assert "tl.maximum(acc, 0.0)" in files[0].read_text() and "acc * 2.0" in files[0].read_text()
    err = capsys.readouterr().err
    assert '[["relu"],["mul",2.0],["add",0]]' in err and "def epilogue(" in err
    assert ep.kernel_function(steps) is fn  # loaded once per process
    ep.kernel_function(ep.check([["relu"]]))
    assert len(list((tmp_path / "epilogues").glob("epilogue_*.py"))) == 2
