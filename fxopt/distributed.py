"""Work across processes with PyTorch's own engines (docs/architecture.md, "Training at scale"):
`torch.distributed`, launched by `torchrun`; nothing of fxopt's own.

`fxopt optimize` under `torchrun --nproc-per-node N` (or `fxopt optimize --nproc N`, which starts
torchrun itself) splits layer-wise training across the processes: each records the sites' values on
a share of the calibration batches and they exchange them; then each site in turn, the costliest
first (by the time of a training step, each process timing a share of the sites), goes to the first
process free to train it (`claims`: a counter in the group's own store), and `share_from_owners`
broadcasts every trained substitute from the process that trained it; process 0 alone validates
and gates them (and runs the accuracy budget). Distillation, when asked for, is data parallel:
`from_process_0` hands every process the substitutes process 0 accepted, each builds the same
rewritten graph, and `layerwise.distill` trains it under DDP with each batch's rows split across
the processes. Process 0 alone goes on (export, the output folder).

Training a rewritten model:

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
  which would overwrite each process's touched rows with process 0's). FSDP2 has no sparse
  gradients at all, so `fully_shard_model` refuses a model with a wta_hash head, as does `index: inputs` (its class
  centroids come from each process's own inputs) under either engine.
"""

from __future__ import annotations

import inspect
import itertools
import os
from datetime import timedelta
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

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


def _require_same_model(model: nn.Module, what: str) -> None:
    """Every process must hold the same rewrite: a rule with `require_speedup` times each layer in
    each process and may keep a different set of sites. Compared by module types and parameter
    shapes; the first difference is named."""
    mine = [(name, type(m).__name__, [tuple(p.shape) for p in m.parameters(recurse=False)])
            for name, m in model.named_modules()]
    every: list[Any] = [None] * world()[1]
    dist.all_gather_object(every, mine)
    for rank, theirs in enumerate(every):
        if theirs != every[0]:
            a, b = next((a, b) for a, b in itertools.zip_longest(every[0], theirs) if a != b)
            name = (a or b)[0] or "the root"
            shown = [f"{m[1]} {' '.join(map(str, m[2]))}".strip() if m else "nothing" for m in (a, b)]
            raise FxoptError(f"{what}: the model differs between processes 0 and {rank} (at {name!r}: "
                             f"{shown[0]} against {shown[1]}); a rule with require_speedup "
                             "times layers in each process and may decide differently: rewrite with rules that do "
                             "not time, or in one process and broadcast the result")


def data_parallel(model: nn.Module, **ddp_options) -> nn.parallel.DistributedDataParallel:
    """`model` wrapped in DistributedDataParallel, its wta_hash heads made ready for it (module
    docstring). `ddp_options` go to DDP unchanged."""
    _require_process_group("data_parallel")
    _require_same_model(model, "data_parallel")
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


# DDP options for buffers that are equal everywhere and never change in training (distillation
# trains substitutes in a model held in eval mode): no broadcast before each forward. torch 2.13
# renamed the option and warns on the old name.
NO_BUFFER_SYNC = ({"forward_sync_buffers": False}
                  if "forward_sync_buffers" in inspect.signature(nn.parallel.DistributedDataParallel).parameters
                  else {"broadcast_buffers": False})


def fully_shard_model(model: nn.Module, mesh=None, **fsdp_options) -> nn.Module:
    """FSDP2 (`torch.distributed.fsdp.fully_shard`) on every top-level substitute of `model`, then
    on `model` itself; returns `model`. Refuses wta_hash heads (module docstring)."""
    from torch.distributed.fsdp import fully_shard

    _require_process_group("fully_shard_model")
    _require_same_model(model, "fully_shard_model")
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


TIMEOUT = float(os.environ.get("FXOPT_DIST_TIMEOUT", 1800))  # seconds a collective may wait


def world() -> tuple[int, int]:
    """(rank, number of processes); (0, 1) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@contextmanager
def process_group() -> Iterator[bool]:
    """Inside: the process group torchrun describes in the environment (WORLD_SIZE > 1) joined,
    gloo on CPU, NCCL where CUDA is available, collectives timing out after FXOPT_DIST_TIMEOUT
    seconds (1800) so that a process whose peer died ends instead of waiting forever; yields
    whether there is one. On the way out the group is destroyed while the interpreter is whole
    (gloo's worker threads still holding work at interpreter exit abort the process)."""
    joined = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not (dist.is_available() and dist.is_initialized())
    if joined:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=timedelta(seconds=TIMEOUT))
    try:
        yield world()[1] > 1
    finally:
        if joined:
            dist.destroy_process_group()


def alone(alone: bool) -> None:
    """Under `fxopt optimize --nproc N` (which sets $FXOPT_THREADS_ALONE): process 0 takes the
    threads one process would have while the others wait or are gone (validation and the gate's
    timings then match one process's), and gives them back while they work (one each)."""
    threads = os.environ.get("FXOPT_THREADS_ALONE")
    if threads and world()[0] == 0:
        torch.set_num_threads(int(threads) if alone else int(os.environ.get("OMP_NUM_THREADS", "1")))


_CLAIMS = itertools.count()  # every process asks for claims alike, so their counts agree


def claims(total: int, what: str) -> Iterator[int]:
    """Indices 0 … total−1, each to the first process of the group that asks for the next one: an
    atomic counter in the group's own key-value store (the one init_process_group set up), so a
    process that finishes early takes more. Every process must iterate to the end."""
    store = dist.distributed_c10d._get_default_store()
    key = f"fxopt/{what}/{next(_CLAIMS)}"
    while (i := store.add(key, 1) - 1) < total:
        yield i


def _broadcast_into(tensors: Sequence[torch.Tensor], src: int) -> None:
    """In place: every process's `tensors` (the same shapes and dtypes everywhere) take `src`'s
    values, one flat broadcast per dtype."""
    for dtype in sorted({t.dtype for t in tensors}, key=str):
        group = [t for t in tensors if t.dtype == dtype]
        flat = (torch.cat([t.reshape(-1) for t in group]) if world()[0] == src
                else torch.empty(sum(t.numel() for t in group), dtype=dtype))
        dist.broadcast(flat, src=src)
        if world()[0] != src:
            for t, part in zip(group, flat.split([t.numel() for t in group])):
                t.copy_(part.view_as(t))


def share_from_owners(modules: Sequence[nn.Module], owners: Sequence[int]) -> None:
    """Every process ends with each module's parameters and buffers as its owner left them: one
    broadcast per owner, of everything it owns flattened (per dtype)."""
    for owner in sorted(set(owners)):
        _broadcast_into([t.data for m, o in zip(modules, owners) if o == owner
                         for t in itertools.chain(m.parameters(), m.buffers())], owner)


def broadcast_tensors(tensors: dict[str, torch.Tensor] | None, src: int) -> dict[str, torch.Tensor]:
    """`src`'s named tensors in every process (the others pass None): their shapes and dtypes as
    one object, then `_broadcast_into` empty tensors of those shapes."""
    meta = [None if tensors is None else [(k, t.shape, t.dtype) for k, t in tensors.items()]]
    dist.broadcast_object_list(meta, src=src)
    if tensors is None:
        tensors = {k: torch.empty(shape, dtype=dtype) for k, shape, dtype in meta[0]}
    _broadcast_into(list(tensors.values()), src)
    return tensors


def from_process_0(accepted: list[tuple[Any, nn.Module]], candidates: Sequence[tuple[Any, nn.Module]]
                   ) -> list[tuple[Any, nn.Module]]:
    """Process 0's accepted (site, substitute) pairs in every process: the substitutes pickled and
    broadcast (a budget rung is a different module from the one the process built), each paired with
    the process's own site of the same key."""
    sites = {site.key: site for site, _ in candidates}
    payload = [[(site.key, module) for site, module in accepted] if world()[0] == 0 else None]
    dist.broadcast_object_list(payload, src=0)
    return accepted if world()[0] == 0 else [(sites[key], module) for key, module in payload[0]]


def merged(part: dict[str, Any]) -> dict[str, Any]:
    """The union of every process's dict (keys are disjoint: each names what its process owned)."""
    parts: list[Any] = [None] * world()[1]
    dist.all_gather_object(parts, part)
    return {k: v for p in parts for k, v in p.items()}
