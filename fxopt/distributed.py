"""Training a rewritten model across processes with PyTorch's own engines (docs/architecture.md,
"Training at scale"): `torch.distributed`, launched by `torchrun`; nothing of fxopt's own.

    model = rewrite(model, example_inputs, "lowrank", training=True).model   # fxopt.pipeline
    model = data_parallel(model)        # DistributedDataParallel
    model = fully_shard_model(model)    # or FSDP2: each substitute and the root, sharded

Substitutes are ordinary modules: DDP replicates them and all-reduces their gradients; FSDP2
shards every parameter along its first dimension and gathers it for the forward. Two need care:

* `binary` restores its constraint after each optimizer step (`fxopt.substitutes.constrain_`),
  which acts on each process's own copy or shard alike.
* `wta_hash` heads produce sparse row gradients, which DDP cannot all-reduce on every backend
  (pytorch#111422). `data_parallel` turns them dense before DDP sees them (a (C, D) gradient per
  step: correct, not cheap), and makes every process rehash the union of the rows touched on any
  process, so that the hash tables stay identical (they are left out of DDP's buffer broadcast,
  which would overwrite each process's touched rows with process 0's). FSDP2 has no sparse gradients at all, so
  `fully_shard_model` refuses a model with a wta_hash head, as does `index: inputs` (its class
  centroids come from each process's own inputs) under either engine.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from .errors import FxoptError
from .substitutes import Substitute
from .substitutes.wta_hash import WTAHashedLinear


def _require_process_group(what: str) -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise FxoptError(f"{what} needs torch.distributed initialised: launch with torchrun and call "
                         "torch.distributed.init_process_group() first")


def _wta_heads(model: nn.Module) -> list[tuple[str, WTAHashedLinear]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, WTAHashedLinear)]


def data_parallel(model: nn.Module, **ddp_options) -> nn.parallel.DistributedDataParallel:
    """`model` wrapped in DistributedDataParallel, its wta_hash heads made ready for it (module
    docstring). `ddp_options` go to DDP unchanged."""
    _require_process_group("data_parallel")
    tables = []
    for name, head in _wta_heads(model):
        if head.index == "inputs":
            raise FxoptError(f"{name}: a wta_hash head with index: inputs cannot train across processes (its class "
                             "centroids are means of each process's own inputs); use index: weights")
        head.synchronized = True  # dense row gradients, and rebuilds of the same rows everywhere
        # its tables and touched rows are kept identical by the rebuilds, not copied from process 0
        # (DDP's buffer broadcast would overwrite the rows each process touched before they are shared)
        tables += [f"{name}.{b}" for b, _ in head.named_buffers(recurse=False)]
    if tables:
        nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, tables)
    return nn.parallel.DistributedDataParallel(model, **ddp_options)


def fully_shard_model(model: nn.Module, mesh=None, **fsdp_options) -> nn.Module:
    """FSDP2 (`torch.distributed.fsdp.fully_shard`) on every top-level substitute of `model`, then
    on `model` itself; returns `model`. Refuses wta_hash heads (module docstring)."""
    from torch.distributed.fsdp import fully_shard

    _require_process_group("fully_shard_model")
    heads = _wta_heads(model)
    if heads:
        raise FxoptError(f"{heads[0][0]}: a wta_hash head cannot be sharded by FSDP2 (its row gradients are sparse); "
                         "train the model with data_parallel (DDP) instead")
    for module in _top_level(model, Substitute):
        fully_shard(module, mesh=mesh, **fsdp_options)
    return fully_shard(model, mesh=mesh, **fsdp_options)


def _top_level(model: nn.Module, kind: type) -> list[nn.Module]:
    """Modules of `kind` inside `model` that are not inside another of them."""
    found: list[nn.Module] = []

    def visit(module: nn.Module) -> None:
        for child in module.children():
            if isinstance(child, kind):
                found.append(child)
            else:
                visit(child)

    visit(model)
    return found


def union_across_processes(mask: torch.Tensor) -> torch.Tensor:
    """In place: `mask` (bool) set wherever it is set on any process (no-op in one process)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        flags = mask.to(torch.uint8)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        mask.copy_(flags.bool())
    return mask
