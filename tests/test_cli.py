"""The `fxopt` command: main path, every user-error path (one line, exit 2, no traceback), and
output-directory safety."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from typer.testing import CliRunner

from conftest import EXAMPLES, ROOT
from fxopt.console.cli import app

runner = CliRunner()

GOOD_MODEL = """
    import torch
    from torch import nn

    def build_model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))

    def example_inputs():
        return (torch.randn(8, 64),)
"""


def run(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def assert_one_line_error(code, stderr, *fragments):
    assert code == 2, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("fxopt: error: "), stderr
    assert "Traceback" not in stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def test_optimize_writes_model_and_reports(write, tmp_path):
    model = write("model.py", GOOD_MODEL)
    out = tmp_path / "out"
    code, stdout, stderr = run("optimize", model, "--rules", "kron", "--out", out)
    assert code == 0, stderr
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.pt2", "report.html", "report.json", "report.md"]
    report = json.loads((out / "report.json").read_text())
    assert [s["status"] for s in report["sites"]] == ["applied", "applied", "skipped"]  # the head is excluded
    assert "end to end" in stdout


MODEL_ERRORS = [
    ("missing.py", None, "missing.py: no such model file"),
    ("syntax.py", "def build_model(:\n", "syntax.py: import failed: "),
    ("raises.py", "import torch\nraise RuntimeError('no GPU here')\n", "raises.py: import failed: raises.py:2"),
    ("nomodel.py", "def example_inputs():\n    return ()\n", "defines neither `model` nor `build_model()`"),
    ("notmodule.py", "model = 3\ndef example_inputs():\n    return ()\n", "the model is a int, not a torch.nn.Module"),
    ("noinputs.py", "import torch\nmodel = torch.nn.Linear(2, 2)\n", "defines no `example_inputs()` function"),
    ("badinputs.py", "import torch\nmodel = torch.nn.Linear(2, 2)\ndef example_inputs():\n    return [1, 2]\n",
     "example_inputs() must return a tuple of tensors, got a list of (int, int)"),
    ("buildfails.py", "def build_model():\n    return 1 / 0\ndef example_inputs():\n    return ()\n",
     "build_model() failed: buildfails.py:2 in build_model (`return 1 / 0`): ZeroDivisionError"),
    ("wrongshape.py", "import torch\nmodel = torch.nn.Linear(4, 2)\ndef example_inputs():\n    return (torch.randn(3, 5),)\n",
     "wrongshape.py: the model fails on its example inputs: RuntimeError: mat1 and mat2 shapes cannot be multiplied"),
    ("untraceable.py", """
import torch
from torch import nn

class Gate(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:
            return self.fc(x)
        return x

model = Gate()
def example_inputs():
    return (torch.randn(2, 4),)
""", "untraceable.py:10 in forward (`if x.sum() > 0:`)"),
]


@pytest.mark.parametrize("name, text, fragment", MODEL_ERRORS, ids=[m[0] for m in MODEL_ERRORS])
def test_bad_model_files(write, tmp_path, name, text, fragment):
    path = write(name, text) if text is not None else tmp_path / name
    code, _, stderr = run("optimize", path, "--rules", "kron", "--out", tmp_path / "out")
    assert_one_line_error(code, stderr, fragment)
    assert not (tmp_path / "out").exists()


def test_bad_rules(write, tmp_path):
    model = write("model.py", GOOD_MODEL)
    rules = write("r.yaml", "version: 1\nrules:\n  - substitute: kron\n    params: {rank: -1}\n")
    code, _, stderr = run("optimize", model, "--rules", rules, "--out", tmp_path / "out")
    assert_one_line_error(code, stderr, f"{rules}:4:20: params.rank: expected a positive integer")
    code, _, stderr = run("optimize", model, "--rules", "nosuch", "--out", tmp_path / "out")
    assert_one_line_error(code, stderr, "nosuch:1:1: no such rule file")


def test_rules_check_and_list(write):
    code, stdout, _ = run("rules", "check", "kron", str(ROOT / "rules" / "kron.yaml"))
    assert code == 0 and stdout.count(": ok, 2 rule(s)") == 2
    bad = write("bad.yaml", "version: 1\nrules:\n  - substitute: kron\n    match: {op: conv3d}\n")
    code, _, stderr = run("rules", "check", bad)
    assert_one_line_error(code, stderr, f"{bad}:4:17: unknown op 'conv3d'")
    code, stdout, _ = run("rules", "list")
    assert code == 0
    for text in ("kron", "rank", "compression", "max_flops_ratio", "factors", "32.0", "shipped rule sets"):
        assert text in stdout


def test_existing_output_is_kept_until_success_and_foreign_folders_are_never_touched(write, tmp_path):
    model = write("model.py", GOOD_MODEL)
    out = tmp_path / "out"
    assert run("optimize", model, "--rules", "kron", "--out", out)[0] == 0
    first = (out / "report.json").read_text()
    # a failing run leaves the previous result as it was, and no temporary folder behind
    broken = write("broken.py", textwrap.dedent(GOOD_MODEL) + "\ndef calibration_data():\n    yield (1, 2)\n")
    code, _, stderr = run("optimize", broken, "--rules", "kron", "--out", out)
    assert_one_line_error(code, stderr, "calibration_data() must yield tensors")
    assert (out / "report.json").read_text() == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.py", "model.py", "out"]
    # a successful run replaces it
    assert run("optimize", model, "--rules", "kron", "--out", out, "--calib-batches", "0")[0] == 0
    # a folder that is not an fxopt result is refused
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    code, _, stderr = run("optimize", model, "--rules", "kron", "--out", foreign)
    assert_one_line_error(code, stderr, "not an fxopt result; refusing to overwrite it")
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_strict_fails_on_rollback(write, tmp_path):
    model = write("model.py", GOOD_MODEL)
    rules = write("tight.yaml", "version: 1\nrules:\n  - substitute: kron\n    params: {rank: 1}\n"
                               "    tolerance: {sqnr_db: 40}\n")
    code, stdout, stderr = run("optimize", model, "--rules", rules, "--out", tmp_path / "o")
    assert code == 0 and "rolled_back" in stdout
    code, _, stderr = run("optimize", model, "--rules", rules, "--out", tmp_path / "o", "--strict")
    assert_one_line_error(code, stderr, "--strict: 3 site(s) rolled back")
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert {s["status"] for s in report["sites"]} == {"rolled_back"}


def test_real_process_prints_one_line_and_no_traceback(tmp_path):
    """The installed entry point, in a real process, from another directory."""
    env = {**os.environ, "PYTHONPATH": ""}
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nrules:\n  - substitute: kron\n    priority: high\n")
    proc = subprocess.run([sys.executable, "-m", "fxopt", "rules", "check", str(bad)], cwd=tmp_path,
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 2 and proc.stderr.strip() == f"fxopt: error: {bad}:4:15: priority must be a int, got 'high'"
    proc = subprocess.run([sys.executable, "-m", "fxopt", "optimize", str(EXAMPLES / "mlp.py"), "--rules", "kron",
                           "--out", str(tmp_path / "out")], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out" / "model.pt2").is_file()


def test_layerwise_training_from_a_calibration_file(write, tmp_path):
    model = write("model.py", GOOD_MODEL)
    rules = write("r.yaml", "version: 1\nrules:\n  - substitute: lowrank\n    params: {rank: 4}\n")
    torch.save(torch.randn(40, 64), tmp_path / "calib.pt")  # one tensor: split into batches of 8
    code, stdout, stderr = run("optimize", model, "--rules", rules, "--out", tmp_path / "o", "--calib",
                               tmp_path / "calib.pt", "--layerwise-steps", "5", "--distill-steps", "3",
                               "--no-time-sites")
    assert code == 0, stderr
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["training"]["layerwise_steps"] == 5 and report["training"]["batches"] == 5
    assert report["training"]["distill"]["steps"] == 3
    assert report["validation_batches"] == 6


@pytest.mark.parametrize("content, fragment", [
    (b"not a torch file", "cannot read calibration data"),
    ([1, 2], "batch 0 is not a tensor"),
    ([], "non-empty list"),
])
def test_bad_calibration_files(write, tmp_path, content, fragment):
    model = write("model.py", GOOD_MODEL)
    path = tmp_path / "calib.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    code, _, stderr = run("optimize", model, "--rules", "kron", "--out", tmp_path / "o", "--calib", path)
    assert_one_line_error(code, stderr, str(path), fragment)
    code, _, stderr = run("optimize", model, "--rules", "kron", "--out", tmp_path / "o", "--calib", tmp_path / "no.pt")
    assert_one_line_error(code, stderr, "no such calibration file")
    code, _, stderr = run("optimize", model, "--rules", "kron", "--out", tmp_path / "o", "--layerwise-loss", "l1")
    assert_one_line_error(code, stderr, "unknown layer-wise loss 'l1'")
