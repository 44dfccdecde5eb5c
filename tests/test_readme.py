"""The README's examples are part of the product: its Python snippet runs and its rule-language
example is a valid rule file."""

import re

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
