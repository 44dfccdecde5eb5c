"""torch.compile(model, backend="fxopt", options=...): found by name through the entry point,
rewrites what `fxopt optimize` rewrites (same outputs), per graph when the model breaks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxopt
from fxopt import rules
from fxopt.backend import fxopt_backend
from conftest import load_example

NO_EXCLUSIONS = rules.parse("version: 1\nrules:\n  - name: all\n    match: {op: linear}\n    substitute: kron\n"
                            "    params: {compression: 8, max_flops_ratio: null}\n    tolerance: {cosine: 0.0}\n")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_backend_is_registered_by_entry_point():
    assert "fxopt" in torch._dynamo.list_backends()


@pytest.mark.parametrize("example,ruleset", [("mlp", "kron"), ("transformer", "kron"), ("cnn", "kron"),
                                             ("cnn", "binary")])
def test_outputs_match_the_cli_rewrite(example, ruleset):
    ex = load_example(example)
    model, inputs = ex.build_model(), ex.example_inputs()
    expected = fxopt.optimize(model, inputs, ruleset, time_sites=False).model(*inputs)
    compiled = torch.compile(model, backend="fxopt", options={"rules": ruleset, "inner": "eager"})
    with torch.no_grad():
        out = compiled(*inputs)
        assert not torch.equal(out, model(*inputs))  # something was rewritten
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


class Broken(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 64)

    def forward(self, x):
        x = torch.relu(self.a(x))
        torch._dynamo.graph_break()  # two graphs for Dynamo; nothing for symbolic_trace
        return self.c(torch.relu(self.b(x)))


def test_graph_breaks_each_graph_is_rewritten():
    torch.manual_seed(0)
    model, x = Broken().eval(), torch.randn(4, 64)
    expected = fxopt.optimize(model, (x,), NO_EXCLUSIONS, time_sites=False)
    assert expected.report["totals"]["applied"] == 3
    graphs = []

    def counting(gm, example_inputs, **kw):  # the same backend, counting the graphs it receives
        graphs.append(gm)
        return fxopt_backend(gm, example_inputs, options={"rules": NO_EXCLUSIONS, "inner": "eager"})

    with torch.no_grad():
        out = torch.compile(model, backend=counting)(x)
    assert len(graphs) == 2
    torch.testing.assert_close(out, expected.model(x), rtol=0, atol=1e-6)


def test_no_matching_rule_leaves_the_graph_to_the_inner_compiler():
    ex = load_example("mlp")
    model, inputs = ex.build_model(), ex.example_inputs()
    none = rules.parse("version: 1\nrules:\n  - match: {name: nothing}\n    substitute: kron\n")
    with torch.no_grad():
        out = torch.compile(model, backend="fxopt", options={"rules": none, "inner": "eager"})(*inputs)
        assert torch.equal(out, model(*inputs))


def test_validate_prints_the_site_table(capsys):
    ex = load_example("mlp")
    with torch.no_grad():
        torch.compile(ex.build_model(), backend="fxopt",
                      options={"rules": "kron", "inner": "eager", "validate": True})(*ex.example_inputs())
    out = capsys.readouterr().out
    assert "kron: applied" in out and "end to end" in out


@pytest.mark.parametrize("options,message", [
    ({"inner": "eager"}, "is required"),
    ({"rules": "kron", "inner": "tvm"}, "inner='tvm'"),
    ({"rules": "kron", "speed": 2}, "unknown option"),
    ({"rules": "no_such_rules"}, "no such rule file"),
])
def test_bad_options_say_what_is_wrong(options, message):
    model = nn.Sequential(nn.Linear(8, 8))
    with pytest.raises(Exception, match=message):
        torch.compile(model, backend="fxopt", options=options)(torch.randn(2, 8))


@pytest.mark.slow
def test_inductor_inner_matches_the_cli_and_plain_inductor():
    ex = load_example("mlp")
    model, inputs = ex.build_model(), ex.example_inputs()
    expected = fxopt.optimize(model, inputs, "kron", time_sites=False).model(*inputs)
    none = rules.parse("version: 1\nrules:\n  - match: {name: nothing}\n    substitute: kron\n")
    with torch.no_grad():
        out = torch.compile(model, backend="fxopt", options={"rules": "kron"})(*inputs)
        torch._dynamo.reset()
        untouched = torch.compile(model, backend="fxopt", options={"rules": none})(*inputs)
        torch._dynamo.reset()
        plain = torch.compile(model)(*inputs)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(untouched, plain, rtol=0, atol=0)


# --- training through the backend ----------------------------------------------------------------

def _freeze_rewritten(model, inputs, ruleset):
    """Freeze the layers the rules rewrite (their substitutes are then constants); return the
    CLI's rewrite of the frozen model and the names of the parameters still training."""
    result = fxopt.optimize(model, inputs, ruleset, time_sites=False)
    for site, substitute in result.substitutes:
        substitute.requires_grad_(False)  # in the CLI's model: a constant, as in the backend's
        for name in site.params:
            model.get_parameter(name).requires_grad_(False)
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    return result, trained


def _step(forward, model, inputs):
    """One SGD step: the loss and the gradients it gave, by parameter name (then zeroed)."""
    model.zero_grad(set_to_none=True)
    loss = forward(*inputs).float().square().mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= 0.05 * p.grad
    return loss.item(), grads


@pytest.mark.parametrize("inner", ["eager", "aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
@pytest.mark.parametrize("example", ["mlp", "transformer", "cnn"])
def test_training_step_matches_the_cli_model_and_trains_the_model_own_parameters(example, inner):
    ex = load_example(example)
    model, inputs = ex.build_model().train(), ex.example_inputs()
    twin = ex.build_model().train()
    twin.load_state_dict(model.state_dict())
    cli, trained = _freeze_rewritten(twin, inputs, "kron")
    model.load_state_dict(twin.state_dict())
    for n, p in model.named_parameters():
        p.requires_grad_(n in trained)
    assert trained and cli.report["totals"]["applied"]
    compiled = torch.compile(model, backend="fxopt", options={"rules": "kron", "inner": inner})
    rewritten = cli.model.train()
    for _ in range(2):  # the second step runs on the weights the first step updated, in both
        loss, grads = _step(compiled, model, inputs)
        loss_cli, grads_cli = _step(rewritten, cli.model, inputs)
        assert loss == pytest.approx(loss_cli, rel=1e-5)
        assert set(grads) == set(trained)  # every trainable parameter got its gradient, nothing else
        for name in trained:
            torch.testing.assert_close(grads[name], grads_cli[name], rtol=1e-4, atol=1e-6)
    for name, buffer in model.named_buffers():  # BatchNorm statistics: updated by the two steps only
        torch.testing.assert_close(buffer, cli.model.get_buffer(name) if name in dict(cli.model.named_buffers())
                                   else twin.get_buffer(name), rtol=1e-5, atol=1e-6)


def test_training_across_a_graph_break():
    ruleset = rules.parse("version: 1\nrules:\n  - match: {op: linear, name: b}\n    substitute: kron\n"
                          "    params: {compression: 8, max_flops_ratio: null}\n    tolerance: {cosine: 0.0}\n")
    torch.manual_seed(5)
    model, x = Broken().train(), torch.randn(4, 64)
    twin = Broken().train()
    twin.load_state_dict(model.state_dict())
    cli, trained = _freeze_rewritten(twin, (x,), ruleset)  # b: rewritten and frozen; a and c train
    model.b.requires_grad_(False)
    graphs = []

    def counting(gm, example_inputs, **kw):
        graphs.append(gm)
        return fxopt_backend(gm, example_inputs, options={"rules": ruleset, "inner": "eager"})

    compiled = torch.compile(model, backend=counting)
    for _ in range(2):
        loss, grads = _step(compiled, model, (x,))
        loss_cli, grads_cli = _step(cli.model, cli.model, (x,))
        assert loss == pytest.approx(loss_cli, rel=1e-5)
        assert set(grads) == set(trained) == {"a.weight", "a.bias", "c.weight", "c.bias"}
        for name, g in grads.items():
            torch.testing.assert_close(g, grads_cli[name], rtol=1e-4, atol=1e-6)
    assert len(graphs) == 2


def test_training_refuses_to_drop_a_trainable_parameter():
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64)).train()
    compiled = torch.compile(model, backend="fxopt", options={"rules": NO_EXCLUSIONS, "inner": "eager"})
    with pytest.raises(Exception, match=r"0\.weight requires grad, but the kron substitute at site 0 replaces it "
                                        r"with parameters of its own \(A, B\)"):
        compiled(torch.randn(2, 64))


class WithAttention(nn.Module):
    """nn.MultiheadAttention, which Dynamo keeps as one `F.multi_head_attention_forward` call."""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(64, 4, batch_first=True)
        self.fc = nn.Linear(64, 64)

    def forward(self, x):
        a, _ = self.attn(x, x, x, need_weights=False)
        return self.fc(a)


def test_attention_projections_are_sites_under_the_backend(monkeypatch):
    from fxopt import pipeline

    seen = []
    real = pipeline.rewrite

    def spy(*args, **kwargs):
        result = real(*args, **kwargs)
        seen.append({s["key"]: s["status"] for s in result.report["sites"]})
        return result

    monkeypatch.setattr(pipeline, "rewrite", spy)
    torch.manual_seed(0)
    model, x = WithAttention().eval(), torch.randn(2, 5, 64)
    full = rules.parse("version: 1\nrules:\n  - {substitute: kron, params: {rank: full, max_flops_ratio: null}}\n")
    compiled = torch.compile(model, backend="fxopt", options={"rules": full, "inner": "eager"})
    with torch.no_grad():
        out = compiled(x)
    assert seen == [{"attn.in_proj": "applied", "attn.out_proj": "applied", "fc": "applied"}]
    torch.testing.assert_close(out, model(x), rtol=0, atol=1e-5)
