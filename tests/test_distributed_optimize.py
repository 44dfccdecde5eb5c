"""`fxopt optimize` across processes (fxopt/distributed.py): layer-wise training split by measured
step cost under torchrun (`--nproc 2`, gloo on CPU), distillation data parallel (rows split where
the model's samples are independent, whole batches where not), the same result as one process,
process 0 alone writing, and an error in any process ending them all with its one-line message."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from conftest import ROOT
from fxopt import distributed

RULES = "version: 1\nrules:\n  - {match: {op: conv2d}, substitute: bottleneck, params: {reduction: 2}}\n"


def fxopt(*args, timeout: int = 240, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fxopt", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=None if env is None else os.environ | env)


def test_claims_hand_out_each_index_once_and_start_afresh_each_time(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        assert list(distributed.claims(3, "t")) == [0, 1, 2]
        assert list(distributed.claims(2, "t")) == [0, 1] and list(distributed.claims(0, "t")) == []
    finally:
        dist.destroy_process_group()


def test_two_processes_give_the_one_process_result(tmp_path):
    rules = tmp_path / "r.yaml"
    rules.write_text(RULES)
    common = (ROOT / "examples" / "cnn.py", "--rules", rules, "--layerwise-steps", 10, "--distill-steps", 10,
              "--distill-sites", 0.5, "--no-time-sites")
    one, two = fxopt("optimize", *common, "--out", tmp_path / "one"), fxopt("optimize", *common, "--out",
                                                                               tmp_path / "two", "--nproc", 2)
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-2000:]
    assert two.stdout.count("wrote ") == 1  # process 0 alone reports and writes
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())
    a, b = (torch.export.load(tmp_path / d / "model.pt2").state_dict for d in ("one", "two"))
    assert a.keys() == b.keys()
    for k in a:  # one thread against two, half the rows each in distillation: float summation order only
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)
    # past the cache budget each process records every batch itself and distillation reruns the
    # original at each step: the same result
    streamed = fxopt("optimize", *common, "--out", tmp_path / "streamed", "--nproc", 2,
                     env={"FXOPT_LAYERWISE_CACHE_MB": "0.01"})
    assert streamed.returncode == 0, streamed.stderr[-2000:]
    c = torch.export.load(tmp_path / "streamed" / "model.pt2").state_dict
    for k in a:
        torch.testing.assert_close(c[k], a[k], rtol=1e-4, atol=1e-5)
    d1, d2 = (json.loads((tmp_path / d / "report.json").read_text())["training"]["distill"] for d in ("one", "two"))
    assert d2["processes"] == 2 and d2["split_batches"] == 2  # both calibration batches split by rows
    for key in ("loss_before", "loss_after", "site_loss_before", "site_loss_after"):
        assert abs(d2[key] - d1[key]) <= 1e-5 * d1[key], key


def test_distillation_runs_whole_batches_where_rows_are_not_samples(tmp_path):
    """A (sequence, batch) transformer: splitting dimension 0 would cut sequences, which the check
    on the original's outputs sees; each process then runs whole batches, and binary's constraint
    holds under DDP: the same steps as one process."""
    model = tmp_path / "seqfirst.py"
    model.write_text(
        "import torch\nfrom torch import nn\n"
        "class Model(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        torch.manual_seed(0)\n"
        "        self.embed = nn.Embedding(50, 32)\n"
        "        self.encoder = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0)  # batch_first=False\n"
        "        self.head = nn.Linear(32, 10)\n"
        "    def forward(self, tokens):\n"
        "        return self.head(self.encoder(self.embed(tokens)).mean(0))\n"
        "model = Model().eval()\n"
        "def example_inputs():\n    return (torch.randint(0, 50, (6, 4)),)\n"
        "def calibration_data():\n"
        "    g = torch.Generator().manual_seed(1)\n"
        "    for _ in range(3):\n        yield (torch.randint(0, 50, (6, 4), generator=g),)\n")
    rules = tmp_path / "r.yaml"
    rules.write_text("version: 1\nrules:\n  - {match: {op: linear}, substitute: binary}\n")
    common = (model, "--rules", rules, "--distill-steps", 6, "--no-time-sites")
    one, two = (fxopt("optimize", *common, "--out", tmp_path / str(n), "--nproc", n) for n in (1, 2))
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-2000:]
    a, b = (torch.export.load(tmp_path / d / "model.pt2").state_dict for d in ("1", "2"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)
    d2 = json.loads((tmp_path / "2" / "report.json").read_text())["training"]["distill"]
    assert d2["processes"] == 2 and d2["split_batches"] == 0


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
