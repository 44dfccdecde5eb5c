"""`fxopt optimize` across processes (fxopt/distributed.py): layer-wise training split by measured
step cost under torchrun (`--nproc 2`, gloo on CPU), the same result as one process, process 0
alone writing, and an error in any process ending them all with its one-line message."""

from __future__ import annotations

import subprocess
import sys

import torch

from conftest import ROOT
from fxopt.distributed import balance

RULES = "version: 1\nrules:\n  - {match: {op: conv2d}, substitute: bottleneck, params: {reduction: 2}}\n"


def fxopt(*args, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fxopt", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def test_balance_puts_the_costliest_first_onto_the_least_loaded():
    assert balance([5.0, 1.0, 4.0, 3.0, 3.0], 2) == [0, 1, 1, 1, 0]  # 5, 4, 3 (onto 4), 3 (onto 5), 1: 8 and 8
    assert balance([1.0, 1.0, 1.0], 1) == [0, 0, 0] and balance([], 3) == []


def test_two_processes_give_the_one_process_result(tmp_path):
    rules = tmp_path / "r.yaml"
    rules.write_text(RULES)
    common = (ROOT / "examples" / "cnn.py", "--rules", rules, "--layerwise-steps", 10, "--no-time-sites")
    one, two = fxopt("optimize", *common, "--out", tmp_path / "one"), fxopt("optimize", *common, "--out",
                                                                               tmp_path / "two", "--nproc", 2)
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-2000:]
    assert two.stdout.count("wrote ") == 1  # process 0 alone reports and writes
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())
    a, b = (torch.export.load(tmp_path / d / "model.pt2").state_dict for d in ("one", "two"))
    assert a.keys() == b.keys()
    for k in a:  # one thread against two: float summation order only
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)


def test_an_error_in_one_process_ends_every_process(tmp_path):
    model = tmp_path / "m.py"
    model.write_text(
        "import os, torch\nfrom torch import nn\n"
        "model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3)).eval()\n"
        "def example_inputs():\n    return (torch.randn(2, 3, 12, 12),)\n"
        "def calibration_data():\n"
        "    if os.environ.get('RANK') == '1':\n        raise RuntimeError('no data on this node')\n"
        "    yield (torch.randn(2, 3, 12, 12),)\n")
    rules = tmp_path / "r.yaml"
    rules.write_text(RULES)
    run = fxopt("optimize", model, "--rules", rules, "--layerwise-steps", 5, "--out", tmp_path / "out", "--nproc", 2,
                timeout=120)  # process 0 waits in a collective: it must be ended, not left hanging
    assert run.returncode == 2
    assert "fxopt: error: calibration_data() failed" in run.stderr or "no data on this node" in run.stderr, run.stderr
    assert "Traceback" not in run.stderr and not (tmp_path / "out").exists()
