"""The user's metric (evaluate()) in every report, bounds on it, and the accuracy budget: sites
rolled back, most harmful first as measured, until the bounds hold. On the trained demo model
(examples/digits.py: held-out accuracy of a digit classifier)."""

import json

import pytest
import torch
from torch import nn

import fxopt
from conftest import ROOT, load_example
from fxopt import budget, rules
from fxopt.errors import FxoptError
from fxopt.trace import load_model_file

DIGITS = ROOT / "examples" / "digits.py"


def lowrank(ratio, e2e, tolerance=""):
    return rules.parse(
        "version: 1\nrules:\n  - {match: {op: linear, in_features: {min: 64}, out_features: {min: 128}}, "
        f"substitute: lowrank, params: {{max_flops_ratio: {ratio}}}{tolerance}}}\n"
        f"end_to_end: {e2e}\n", "budget.yaml")


@pytest.fixture(scope="module")
def digits():
    return load_model_file(DIGITS)


def run(spec, ruleset, **kw):
    return fxopt.optimize(spec.model, spec.example_inputs, ruleset, calibration=list(spec.calibration_data()),
                          evaluate=spec.evaluate, time_sites=False, **kw)


def test_the_metric_is_measured_on_the_original_and_the_saved_model(digits, tmp_path):
    result = run(digits, lowrank(0.25, "{metrics: {accuracy: {max_drop: 1.0}}}"))
    m = result.report["end_to_end"]["metrics"]["accuracy"]
    assert m["before"] == pytest.approx(digits.evaluate(digits.model)["accuracy"])
    out = result.save(tmp_path / "out")
    assert m["after"] == pytest.approx(digits.evaluate(fxopt.load(out))["accuracy"])  # the saved program's
    assert m["change"] == pytest.approx(m["after"] - m["before"])
    saved = json.loads((out / "report.json").read_text())
    assert saved["end_to_end"]["metric_bounds"] == {"accuracy": {"max_drop": 1.0}}
    assert "accuracy" in (out / "report.md").read_text() and "accuracy" in (out / "report.html").read_text()


def test_a_violated_metric_bound_is_reported_and_without_enforce_nothing_is_rolled_back(digits):
    result = run(digits, lowrank(0.015, "{metrics: {accuracy: {max_drop: 1.0}}}"))
    e = result.report["end_to_end"]
    assert any(v.startswith("accuracy ") and "beyond max_drop 1" in v for v in e["violations"])
    assert result.report["totals"]["over_budget"] == 0 and result.report["budget"] is None


def test_enforce_rolls_back_the_most_harmful_sites_until_the_budget_holds(digits):
    result = run(digits, lowrank(0.03, "{metrics: {accuracy: {max_drop: 1.0}}, enforce: true}"))
    report = result.report
    b, m = report["budget"], report["end_to_end"]["metrics"]["accuracy"]
    assert b["violations_before"] and b["met"] and report["end_to_end"]["violations"] == []
    assert m["before"] - m["after"] <= 1.0
    over = [s for s in report["sites"] if s["status"] == "over_budget"]
    assert {s["key"] for s in over} == set(b["rolled_back"]) and over
    assert all(s["reason"].startswith("accuracy budget: rolled back") for s in over)
    assert any(s["status"] == "applied" for s in report["sites"])  # not everything went back
    harm = {p["sites"][0]: p["harm"] for p in b["probes"]}
    worst = max(harm, key=harm.get)
    assert worst in b["rolled_back"]  # the most harmful site, as measured, went back


def test_a_site_the_budget_cannot_afford_as_built_comes_back_less_compressed(digits, tmp_path):
    """The demo's first layer at max_flops_ratio 0.0625 costs 46 points; the search gives it back
    at a higher rank (its ladder), trained layer-wise like the others, and the report says so."""
    from fxopt.layerwise import Layerwise

    result = run(digits, lowrank(0.0625, "{metrics: {accuracy: {max_drop: 1.0}}, enforce: true}"),
                 layerwise=Layerwise(steps=4, progress=False))
    report = result.report
    b, m = report["budget"], report["end_to_end"]["metrics"]["accuracy"]
    assert b["met"] and m["before"] - m["after"] <= 1.0 and b["violations_before"]
    assert b["relaxed"] and not b["rolled_back"]
    sites = {s["key"]: s for s in report["sites"]}
    for key, steps in b["relaxed"].items():
        s = sites[key]
        assert s["status"] == "applied" and "given back" in s["reason"]
        assert s["params"]["max_flops_ratio"] == pytest.approx(0.0625 * 2 ** steps)
        module = next(m for site, m in result.substitutes if site.key == key)
        assert s["params_after"] == sum(p.numel() for p in module.parameters())
        assert s["params_after"] < s["params_before"]
        assert s["layerwise"]["steps"] == 4  # the rung was trained, as the rule's own substitute was
    e = report["end_to_end"]
    assert e["params_after"] == e["params_before"] - sum(s["params_before"] - s["params_after"] for s in sites.values())
    line = "given back less compressed: " + ", ".join(f"{k} ({n} step" for k, n in b["relaxed"].items())
    assert line in fxopt.report.budget_line(report)
    out = result.save(tmp_path / "out")
    assert line in (out / "report.md").read_text() and line in (out / "report.html").read_text()


def test_enforce_without_evaluate_bounds_top1_agreement():
    ex = load_example("mlp")
    model = ex.build_model()
    ruleset = rules.parse("version: 1\nrules:\n  - {substitute: kron, params: {compression: 64}}\n"
                          "end_to_end: {top1_agreement: 0.9, enforce: true}\n", "t.yaml")
    result = fxopt.optimize(model, ex.example_inputs(), ruleset, calibration=list(ex.calibration_data()),
                            time_sites=False)
    e, b = result.report["end_to_end"], result.report["budget"]
    assert e["top1_agreement"] >= 0.9 and e["violations"] == []
    assert b["met"] and b["evaluations"] >= 1


class Toy(nn.Module):
    """Three switchable sites; `chosen[key]` is the rung a site runs (0: as the rule built it)."""

    def __init__(self):
        super().__init__()
        self.sites = [type("S", (), {"key": k})() for k in "abc"]
        self.on = set("abc")
        self.chosen = dict.fromkeys("abc", 0)


def toy_measure(cost: dict[str, float], allowed: float):
    def measure(toy):  # the loss of accuracy: the sum over the sites left on, halved per rung climbed
        loss = sum(cost[k] / 2 ** toy.chosen[k] for k in toy.on)
        return (["over"] if loss > allowed else []), {"metric:acc": (allowed - loss) / allowed}

    return measure


def test_search_order_and_retry_on_a_measured_toy():
    """The search rolls back the most harmful site, and puts back a rolled-back one the budget
    can afford."""
    found = budget.search(Toy(), toy_measure({"a": 5.0, "b": 1.0, "c": 3.0}, 4))
    assert found.met and found.rolled_back == ["a"]  # a alone brings 9 → 4
    assert [p["sites"] for p in found.probes] == [["a"], ["b"], ["c"]]
    assert found.relaxed == {} and found.evaluations == 1 + 3 + 1  # no ladder: nothing more to try


def test_the_search_climbs_the_ladder_before_giving_a_site_up():
    """A rolled-back site comes back at the first rung (each halving its harm) the budget affords;
    a site without a ladder stays rolled back."""
    toy = Toy()
    found = budget.search(toy, toy_measure({"a": 5.0, "b": 1.0, "c": 3.0}, 6), lambda key, k: k)
    assert found.met and found.rolled_back == [] and found.relaxed == {"a": 2}  # 4 + 5/2 > 6, 4 + 5/4 ≤ 6
    assert toy.on == set("abc") and toy.chosen == {"a": 2, "b": 0, "c": 0}
    toy = Toy()
    found = budget.search(toy, toy_measure({"a": 5.0, "b": 1.0, "c": 3.0}, 6), lambda key, k: k if key != "a" else None)
    assert found.rolled_back == ["a"] and found.relaxed == {} and toy.chosen["a"] == 0


def test_metric_errors_are_one_line_naming_the_cause(digits):
    with pytest.raises(FxoptError, match="budget.yaml:4: end_to_end.metrics bounds 'f1', but evaluate\\(\\) returns only accuracy"):
        run(digits, lowrank(0.25, "{metrics: {f1: {max_drop: 1.0}}}"))
    with pytest.raises(FxoptError, match="bounds 'accuracy', but the model defines no evaluate"):
        fxopt.optimize(digits.model, digits.example_inputs, lowrank(0.25, "{metrics: {accuracy: {max_drop: 1}}}"))
    with pytest.raises(FxoptError, match="evaluate\\(\\) failed on the original model: .*ZeroDivisionError"):
        fxopt.optimize(digits.model, digits.example_inputs, "lowrank", evaluate=lambda m: 1 / 0)
    with pytest.raises(FxoptError, match="must return a dict of metric name → number; 'acc' is str"):
        fxopt.optimize(digits.model, digits.example_inputs, "lowrank", evaluate=lambda m: {"acc": "high"})


def test_the_saved_model_takes_eval_but_refuses_train(digits, tmp_path):
    result = run(digits, lowrank(0.25, "{metrics: {accuracy: {max_drop: 1.0}}}"))
    loaded = fxopt.load(result.save(tmp_path / "out"))
    assert loaded.eval() is loaded
    with pytest.raises(NotImplementedError, match="inference program"):
        loaded.train()
    x = digits.example_inputs[0]
    torch.testing.assert_close(loaded(x), result.model(x), rtol=1e-4, atol=1e-4)


def test_cli_prints_the_metric_and_strict_fails_on_its_bound(tmp_path):
    from typer.testing import CliRunner

    from fxopt.console.cli import app

    rule_file = tmp_path / "r.yaml"
    rule_file.write_text("version: 1\nrules:\n  - {match: {op: linear, in_features: {min: 128}}, substitute: lowrank, "
                         "params: {max_flops_ratio: 0.015}}\nend_to_end: {metrics: {accuracy: {max_drop: 0.5}}}\n")
    result = CliRunner().invoke(app, ["optimize", str(DIGITS), "--rules", str(rule_file), "--out",
                                      str(tmp_path / "out"), "--no-time-sites", "--strict"])
    assert result.exit_code == 2, result.output
    assert "your metric: accuracy 98.22 →" in result.output.replace("\n", " ")
    assert "--strict:" in result.output and "beyond max_drop 0.5" in result.output


def test_the_demo_keeps_accuracy_within_one_point_and_is_smaller(digits):
    result = run(digits, rules.load(ROOT / "examples" / "digits.yaml"))
    e = result.report["end_to_end"]
    assert e["metrics"]["accuracy"]["before"] >= 95  # a trained model, measured on held-out images
    assert e["metrics"]["accuracy"]["change"] >= -1.0 and e["violations"] == []
    assert e["params_before"] / e["params_after"] >= 4


@pytest.mark.slow
def test_the_demo_is_faster_best_against_best(digits):
    from fxopt.bench import bench

    timings = bench(digits.model, digits.example_inputs, rules.load(ROOT / "examples" / "digits.yaml"),
                    calibration=list(digits.calibration_data()), evaluate=digits.evaluate, rounds=3, min_run_time=0.1)
    assert timings["end_to_end"]["speedup"]["best"] > 1.2
    assert timings["metrics"]["accuracy"]["change"] >= -1.0
