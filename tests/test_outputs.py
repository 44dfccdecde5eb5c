"""Reports for any output: one line per output of a tuple/dict-returning model, and a reference
that is numerically zero or constant flagged instead of given meaningless relative metrics."""

import pytest
import torch
from rich.console import Console
from torch import nn

import fxopt
from fxopt import rules
from fxopt.html import report_page
from fxopt.report import markdown, print_summary
from fxopt.validate import ErrorStats

BOXES_ONLY = rules.parse("version: 1\nrules:\n  - {match: {name: box}, substitute: binary}\n", "boxes.yaml")


class Detector(nn.Module):
    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.body, self.cls, self.box = nn.Linear(64, 128), nn.Linear(128, 10), nn.Linear(128, 4)
        self.scale = scale

    def forward(self, x):
        h = torch.relu(self.body(x))
        return {"logits": self.cls(h) * self.scale, "boxes": self.box(h) * self.scale}


def _text(report):
    console = Console(record=True, width=200)
    print_summary(report, console)
    return console.export_text()


def test_each_output_of_a_dict_model_gets_its_own_line():
    torch.manual_seed(0)
    result = fxopt.optimize(Detector(), (torch.randn(32, 64),), BOXES_ONLY, time_sites=False)
    e = result.report["end_to_end"]
    assert [s["status"] for s in result.report["sites"] if s["key"] == "box"] == ["applied"]
    outputs = {o["name"]: o for o in e["outputs"]}
    assert set(outputs) == {"['logits']", "['boxes']"}
    assert outputs["['logits']"]["max_abs"] == 0 and outputs["['boxes']"]["rel_l2"] > 0.1
    # the aggregate hides the broken output; the per-output line does not
    assert e["rel_l2"] < outputs["['boxes']"]["rel_l2"]
    text = _text(result.report)
    assert "output ['boxes']: rel L2" in text and "output ['logits']: rel L2 0 " in text
    assert "| `['boxes']` | rel L2" in markdown(result.report)
    assert "<code>[&#x27;boxes&#x27;]</code>" in report_page(result.report)


def test_a_tuple_model_names_its_outputs_by_position():
    class Pair(Detector):
        def forward(self, x):
            d = super().forward(x)
            return d["logits"], d["boxes"]

    result = fxopt.optimize(Pair(), (torch.randn(8, 64),), BOXES_ONLY, time_sites=False)
    assert [o["name"] for o in result.report["end_to_end"]["outputs"]] == ["[0]", "[1]"]


def test_a_numerically_zero_reference_is_flagged_and_its_relative_metrics_withheld():
    ruleset = rules.parse("version: 1\nrules:\n  - {match: {name: box}, substitute: binary}\n"
                          "end_to_end: {cosine: 0.9}\n", "zero.yaml")
    result = fxopt.optimize(Detector(scale=1e-15), (torch.randn(16, 64),), ruleset, time_sites=False)
    e = result.report["end_to_end"]
    assert e["degenerate_reference"].startswith("numerically zero")
    assert e["cosine"] is None and e["rel_l2"] is None and e["max_abs"] > 0
    assert e["violations"] == ["cosine not meaningful: the reference output is " + e["degenerate_reference"]]
    boxes = {o["name"]: o for o in e["outputs"]}["['boxes']"]
    assert "degenerate_reference" in boxes and "cosine" not in boxes
    assert "mean nothing on these inputs" in _text(result.report).replace("\n", " ")
    assert "relative metrics not meaningful" in markdown(result.report)


@pytest.mark.parametrize("ref,flag", [(torch.full((4, 3), 2.5), "constant"), (torch.zeros(4, 3), "numerically zero"),
                                      (torch.randn(4, 3), None)])
def test_error_stats_flag_a_degenerate_reference(ref, flag):
    stats = ErrorStats()
    stats.update(ref, ref + 0.01)
    metrics = stats.metrics()
    if flag is None:
        assert "degenerate_reference" not in metrics and metrics["rel_l2"] > 0
    else:
        assert metrics["degenerate_reference"].startswith(flag) and "rel_l2" not in metrics
    exact = ErrorStats()
    exact.update(ref, ref.clone())  # an exact match stays exact, flagged or not
    assert exact.metrics()["rel_l2"] == 0
