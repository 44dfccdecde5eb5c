"""Rewritten models train under DDP and FSDP2 (fxopt/distributed.py): every substitute in its
training form, 2 gloo processes on CPU launched by torchrun, 3 optimizer steps on halves of each
batch, parameters equal to a one-process run on the whole batches; and what cannot be sharded is
refused in one line (tests/distributed_worker.py runs in the processes)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from torch import nn

from conftest import ROOT
from fxopt.distributed import data_parallel, fully_shard_model
from fxopt.errors import FxoptError

TOLERANCE = 1e-6  # parameters of order 0.1 after 3 SGD steps; float32 reductions in another order


def torchrun(script, *args, nproc: int = 2, timeout: int = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                           str(nproc), str(script), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT / "tests")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist") / "results.json"
    run = torchrun(ROOT / "tests" / "distributed_worker.py", out)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("case", ["kron", "kron_mixed", "lowrank", "separable", "bottleneck", "binary", "wta_hash"])
@pytest.mark.parametrize("engine", ["ddp", "fsdp2"])
def test_two_processes_train_as_one_on_the_whole_batch(results, case, engine):
    r = results[case][engine]
    if case == "wta_hash" and engine == "fsdp2":
        assert r == {"refused": "4: a wta_hash head cannot be sharded by FSDP2 (its row gradients are sparse); "
                                "train the model with data_parallel (DDP) instead"}
        return
    assert "failed" not in r, r.get("failed")
    assert r["max_abs_difference"] <= TOLERANCE
    assert r["max_abs_change"] > 100 * TOLERANCE  # training moved the parameters: the equality means something
    if case == "wta_hash":  # sparse row gradients made dense for DDP; tables rebuilt from the same rows
        assert r["rebuilds"] == r["reference_rebuilds"] >= 2 and r["same_tables"]


def test_a_head_indexed_by_inputs_is_refused(results):
    assert "index: inputs cannot train across processes" in results["wta_hash_inputs"]["ddp"]["refused"]


@pytest.mark.parametrize("engine", ["ddp", "fsdp2"])
def test_processes_holding_different_rewrites_are_told_so(results, engine):
    message = results["different"][engine]["refused"]
    assert message and "the model differs between processes 0 and 1 (at '2': Linear (64, 128) (64,) against Linear (10, 128) (10,))" in message, message
    assert "require_speedup" in message


def test_without_a_process_group_the_error_says_how_to_launch():
    for wrap in (data_parallel, fully_shard_model):
        with pytest.raises(FxoptError, match="needs torch.distributed initialised: launch with torchrun"):
            wrap(nn.Linear(2, 2))
