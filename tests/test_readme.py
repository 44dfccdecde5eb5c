"""The README's examples are part of the product: its Python snippet runs and its rule-language
example is a valid rule file."""

import re

import pytest
import torch

from conftest import ROOT
from fxopt import rules

README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_python_snippet_runs(tmp_path, monkeypatch):
    snippet = re.search(r"In Python:\n\n```python\n(.*?)```", README, re.S).group(1)
    monkeypatch.chdir(ROOT)  # the snippet imports examples/ from the repository root
    monkeypatch.syspath_prepend(str(ROOT))
    snippet = snippet.replace('"out/mlp"', repr(str(tmp_path / "mlp")))
    namespace = {}
    exec(compile(snippet, "README.md", "exec"), namespace)
    assert isinstance(namespace["loaded"](torch.randn(2, 1, 28, 28)), torch.Tensor)
    assert (tmp_path / "mlp" / "model.pt2").is_file()


def test_rule_language_example_is_valid():
    block = re.search(r"## Rule language \(schema version 1\)\n\n```yaml\n(.*?)```", README, re.S).group(1)
    ruleset = rules.parse(block, "README.md")
    (rule,) = ruleset.rules
    assert rule.name == "kron-big-linears" and rule.priority == 0
    assert ruleset.end_to_end.top1_agreement == 0.95


def test_every_shipped_rule_set_named_in_a_command_exists_and_has_a_section():
    named = {n for n in re.findall(r"fxopt (?:optimize|bench) \S+ --rules (\S+)", README) if not n.endswith(".yaml")}
    assert named and named <= set(rules.shipped()), named - set(rules.shipped())
    for name in rules.shipped():
        assert f"### `{name}`" in README, f"no README section for the shipped rule set {name}"


def test_wta_hash_training_snippet_runs():
    snippet = re.search(r"Training touches only candidate rows.*?```python\n(.*?)```", README, re.S).group(1)
    namespace = {}
    exec(compile(snippet, "README.md", "exec"), namespace)
    assert namespace["head"].weight.grad.layout == torch.sparse_coo
    assert namespace["dense_logits"].shape == (128, 100_000)


def test_backend_training_snippet_runs():
    torch._dynamo.reset()
    snippet = re.search(r"fine-tuning a head on a compressed, frozen backbone:\n\n```python\n(.*?)```", README, re.S).group(1)
    namespace = {}
    exec(compile(snippet, "README.md", "exec"), namespace)
    model = namespace["model"]
    assert model[4].weight.grad is not None and model[4].weight.grad.abs().sum() > 0
    assert model[0].weight.grad is None
    torch._dynamo.reset()  # the same model with layer 0 trainable: rewritten, so refused
    model[0].requires_grad_(True)
    compiled = torch.compile(model, backend="fxopt", options={"rules": "kron", "inner": "eager"})
    with pytest.raises(Exception, match="0.weight requires grad, but the kron substitute at site 0"):
        compiled(namespace["x"])
    torch._dynamo.reset()


def test_training_at_scale_snippet_runs_in_two_processes(tmp_path):
    from test_distributed import torchrun

    snippet = re.search(r"## Training at scale\n.*?```python\n(.*?)```", README, re.S).group(1)
    script = tmp_path / "finetune.py"
    script.write_text(snippet + "print('finished', flush=True)\n")
    run = torchrun(script)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("finished") == 2
