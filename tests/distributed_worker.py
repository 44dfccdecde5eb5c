"""Run by tests/test_distributed.py under torchrun (2 processes, gloo on CPU): for every substitute
in its training form, a model rewritten by fxopt is trained 3 optimizer steps with DDP
(`fxopt.distributed.data_parallel`) and with FSDP2 (`fully_shard_model`), each process on its half
of every batch, and its parameters are compared with a one-process run on the whole batches.
Process 0 writes {case: {engine: max |difference|, ...}} and the refusals' messages as JSON."""

from __future__ import annotations

import copy
import json
import sys
import traceback

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import fxopt
from fxopt import rules
from fxopt.console.cli import _end_now
from fxopt.distributed import data_parallel, fully_shard_model
from fxopt.errors import FxoptError
from fxopt.pipeline import rewrite
from fxopt.substitutes import constrain_

STEPS, BATCH, LR = 3, 8, 0.05


def mlp(out: int = 10) -> nn.Module:
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, out))


def cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(16 * 6 * 6, 10))


MIXED = "[{out: [8, 16], in: [8, 8], rank: 1}, {out: [16, 8], in: [4, 16], rank: 1}]"
CASES = {  # name: (model, input shape, rule)
    "kron": (mlp, (64,), "{substitute: kron, params: {rank: 2}}"),
    "kron_mixed": (mlp, (64,), "{match: {in_features: {min: 64, max: 64}, out_features: {min: 128, max: 128}}, substitute: kron, params: {factors: "
                   + MIXED + "}}"),
    "lowrank": (mlp, (64,), "{substitute: lowrank, params: {max_flops_ratio: 0.25}}"),
    "separable": (cnn, (8, 6, 6), "{match: {op: conv2d}, substitute: separable}"),
    "bottleneck": (cnn, (8, 6, 6), "{match: {op: conv2d}, substitute: bottleneck, params: {reduction: 2}}"),
    "binary": (mlp, (64,), "{substitute: binary}"),
    "wta_hash": (lambda: mlp(1024), (64,), "{match: {out_features: {min: 1024}}, substitute: wta_hash, "
                 "params: {candidates: 64, rebuild_every: 2}}"),
}


def rewritten(case: str) -> nn.Module:
    build, shape, rule = CASES[case]
    torch.manual_seed(0)
    model = build().eval()
    ruleset = rules.parse(f"version: 1\nrules:\n  - {rule}\n", f"{case}.yaml")
    result = rewrite(model, (torch.randn(4, *shape),), ruleset, training=True)
    applied = [s for s in result.report["sites"] if s["status"] == "applied"]
    assert applied, f"{case}: nothing applied"
    return result.model.train()


def batches(case: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    shape = CASES[case][1]
    out = []
    for step in range(STEPS):
        g = torch.Generator().manual_seed(100 + step)
        out.append((torch.randn(BATCH, *shape, generator=g), torch.randn(BATCH, 10, generator=g)))
    return out


def loss_fn(case: str, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if case == "wta_hash":  # outputs not computed are −inf: a loss on the computed ones (sparse gradients)
        return torch.where(torch.isfinite(output), output, 0.0).square().sum(-1).mean()
    return F.mse_loss(output, target)


def train(case: str, model: nn.Module, part: slice) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for x, y in batches(case):
        opt.zero_grad()
        loss_fn(case, model(x[part]), y[part]).backward()
        opt.step()
        constrain_([model])


def full(p: torch.Tensor) -> torch.Tensor:
    return p.full_tensor() if hasattr(p, "full_tensor") else p


def difference(reference: nn.Module, trained: nn.Module) -> float:
    want = dict(reference.named_parameters())
    got = {name: full(p.detach()) for name, p in trained.named_parameters()}
    assert set(got) == set(want), set(got) ^ set(want)
    return max((got[k] - want[k].detach()).abs().max().item() for k in want)


def main(out_path: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    part = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    results: dict = {}
    for case in CASES:
        base = rewritten(case)
        reference = copy.deepcopy(base)
        train(case, reference, slice(None))
        results[case] = {}
        for engine in ("ddp", "fsdp2"):
            model = copy.deepcopy(base)
            try:
                wrapped = data_parallel(model) if engine == "ddp" else fully_shard_model(model)
            except FxoptError as exc:
                results[case][engine] = {"refused": str(exc)}
                continue
            try:
                train(case, wrapped, part)
                trained = wrapped.module if engine == "ddp" else wrapped
                results[case][engine] = {"max_abs_difference": difference(reference, trained),
                                         "max_abs_change": difference(reference, base)}
                if case == "wta_hash":  # the hash tables were rebuilt during training, identically
                    ref_head, head = (getattr(m, "4") for m in (reference, trained))
                    results[case][engine] |= {"rebuilds": head.rebuilds, "reference_rebuilds": ref_head.rebuilds,
                                              "same_tables": bool(torch.equal(head.row_keys, ref_head.row_keys))}
            except Exception:
                results[case][engine] = {"failed": traceback.format_exc()}
    try:  # index: inputs is refused by DDP too
        head = fxopt.substitutes.wta_hash.WTAHashedLinear.from_original(nn.Linear(64, 1024), index="inputs")
        data_parallel(nn.Sequential(head))
    except FxoptError as exc:
        results["wta_hash_inputs"] = {"ddp": {"refused": str(exc)}}
    # processes whose rewrites differ (as a timed require_speedup may leave them) are told so
    different = mlp() if dist.get_rank() == 0 else nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    for engine, wrap in (("ddp", data_parallel), ("fsdp2", fully_shard_model)):
        try:
            wrap(copy.deepcopy(different))
            results.setdefault("different", {})[engine] = {"refused": None}
        except FxoptError as exc:
            results.setdefault("different", {})[engine] = {"refused": str(exc)}
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(results, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
    _end_now(0)  # as fxopt's own processes end: Python's teardown after gloo sometimes aborts
