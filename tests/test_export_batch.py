"""A saved model takes any batch size, whatever the example inputs' batch (issue: batch-1 example
inputs used to be saved with the batch dimension specialised to 1)."""

from pathlib import Path

import pytest
import torch
from torch import nn

import fxopt
from fxopt.rules import parse
from fxopt.trace import load_model_file

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = [("mlp", "kron"), ("cnn", "bottleneck"), ("cnn_large_kernels", "binary"), ("transformer", "lowrank"),
            ("xc", "wta_hash"), ("digits", "lowrank")]


@pytest.mark.parametrize("example,rules", EXAMPLES)
def test_batch_one_example_saves_a_model_taking_any_batch(example, rules, tmp_path):
    spec = load_model_file(ROOT / "examples" / f"{example}.py")
    one = tuple(t[:1] for t in spec.example_inputs)
    plain = parse(f"version: 1\nrules:\n  - {{substitute: {rules}}}\n", "plain.yaml")  # no tolerance, no gate
    result = fxopt.optimize(spec.model, one, plain, time_sites=False)
    assert result.report["export"]["batch"] == {"dynamic": True}
    assert result.report["totals"]["applied"] > 0
    loaded = fxopt.load(result.save(tmp_path / "out"))
    rewritten = result.model.eval()
    for n in (1, 3):
        x = tuple(t[:n] for t in spec.example_inputs)
        with torch.no_grad():
            torch.testing.assert_close(loaded(*x), rewritten(*x), rtol=1e-4, atol=1e-4)


class FixesBatch(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(64, 64), nn.Linear(64, 10)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)).view(1, 64))  # batch 1 only


def test_a_model_that_fixes_its_batch_is_saved_fixed_and_says_so(tmp_path, capsys):
    result = fxopt.optimize(FixesBatch(), (torch.randn(1, 64),), "kron", time_sites=False)
    assert result.report["export"]["batch"] == {"dynamic": False, "size": 1}
    assert "1 only" in fxopt.report.markdown(result.report)
    fxopt.report.print_summary(result.report)
    assert "takes batch size 1 only" in capsys.readouterr().out
    loaded = fxopt.load(result.save(tmp_path / "out"))
    assert loaded(torch.randn(1, 64)).shape == (1, 10)
    with pytest.raises(ValueError, match="batch size fixed at 1.*got a batch of 8"):
        loaded(torch.randn(8, 64))
