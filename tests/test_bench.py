"""`fxopt bench`: what it measures and records (its numbers are timings: no test asserts speed)."""

import json

import pytest
import torch

from conftest import EXAMPLES, load_example
from fxopt.bench import bench, speedups
from fxopt.console.cli import app
from typer.testing import CliRunner


def test_speedups_are_original_over_rewritten_and_best_compares_the_faster_sides():
    t = {"original": 4.0, "fxopt": 2.0, "original+compile": 3.0, "fxopt+compile": 6.0}
    assert speedups(t, compiled=True) == {"eager": 2.0, "compiled": 0.5, "best": 1.5}
    assert speedups({"original": 1.0, "fxopt": 4.0}, compiled=False) == {"eager": 0.25, "compiled": None, "best": 0.25}


def test_bench_times_end_to_end_and_every_applied_site():
    ex = load_example("mlp")
    timings = bench(ex.build_model(), ex.example_inputs(), "kron", compile=False, rounds=1, min_run_time=0.001)
    assert set(timings["end_to_end"]["us"]) == {"original", "fxopt"}
    assert [s["name"] for s in timings["sites"]] == ["1", "3"]  # the applied sites, not the skipped head
    for site in timings["sites"]:
        assert site["substitute"] == "KronLinear" and site["input_shape"] == [32, site["input_shape"][1]]
        assert site["speedup"]["eager"] == pytest.approx(site["us"]["original"] / site["us"]["fxopt"], rel=0.01)
    assert timings["environment"]["device"].startswith("cpu") and timings["environment"]["threads"] >= 1
    assert timings["size"]["params_before"] > timings["size"]["params_after"]
    assert timings["accuracy"]["top1_agreement"] is not None


@pytest.mark.slow
def test_bench_under_torch_compile():
    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256)).eval()
    timings = bench(model, (torch.randn(16, 256),), "kron", rounds=1, min_run_time=0.001)
    assert set(timings["end_to_end"]["us"]) == {"original", "fxopt", "original+compile", "fxopt+compile"}
    assert timings["end_to_end"]["speedup"]["best"] > 0 and timings["sites"]


def test_cli_bench_writes_json(tmp_path):
    out = tmp_path / "timings" / "bench.json"
    result = CliRunner().invoke(app, ["bench", str(EXAMPLES / "cnn.py"), "--rules", "kron", "--no-compile",
                                      "--rounds", "1", "--min-run-time", "0.001", "--out", str(out)])
    assert result.exit_code == 0, result.stderr
    assert "end to end" in result.stdout and "stage1.0" in result.stdout
    data = json.loads(out.read_text())
    assert data["model"].endswith("cnn.py") and data["compiled"] is False
    assert [p.name for p in out.parent.iterdir()] == ["bench.json"]  # no temporary file left behind


def test_cli_bench_trains_layerwise_when_asked(tmp_path):
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(app, ["bench", str(EXAMPLES / "cnn.py"), "--rules", "separable", "--no-compile",
                                      "--rounds", "1", "--min-run-time", "0.001", "--layerwise-steps", "3",
                                      "--out", str(out)])
    assert result.exit_code == 0, result.stderr
    assert json.loads(out.read_text())["training"]["layerwise_steps"] == 3


def test_cli_bench_bad_input_is_one_line(tmp_path):
    result = CliRunner().invoke(app, ["bench", str(tmp_path / "nope.py"), "--rules", "kron"])
    assert result.exit_code == 2 and result.stderr.strip() == f"fxopt: error: {tmp_path / 'nope.py'}: no such model file"
    folder = tmp_path / "dir"
    folder.mkdir()
    result = CliRunner().invoke(app, ["bench", str(EXAMPLES / "mlp.py"), "--rules", "kron", "--no-compile",
                                      "--rounds", "1", "--min-run-time", "0.001", "--out", str(folder)])
    assert result.exit_code == 2 and result.stderr.strip() == f"fxopt: error: {folder}: is a directory"
