"""Layer-wise training of substitutes against the original layers' outputs (Zeng & Tian 2017).

A lossy substitute starts from `from_original` (an SVD-type fit of the weight), which minimises
the weight error, not the error on the data the layer sees. Layer-wise training closes that gap:
each substitute is trained, independently of the others, to map the inputs its original layer
receives on calibration data to the outputs the original layer produces. A substitute that can
solve that least-squares problem in closed form (`fit_inputs`: lowrank's SVD of the weight
whitened by the inputs' Gram matrix) does so first, from one pass over the data; the gradient
steps then start from the optimum of the squared error.

Each step of a site is one optimiser step on one calibration batch: the original graph's values at
the site's input and output on that batch (an fx `Interpreter` that keeps only those, and stops at
the last). They are recorded once per batch and kept while all batches' fit in a budget
($FXOPT_LAYERWISE_CACHE_MB, 2 GiB), and each site then trains alone through all its steps; beyond
it the graph runs again at every step for all sites at once, so memory stays bounded by one batch.
The sites are independent, so either order trains the same substitutes. Losses are scale-free, so
one learning rate fits every site:

    mse     ‖y − t‖² / ‖t‖²               (relative squared error)
    cosine  1 − mean over samples of cos(y, t)

`distill` is the optional last step: the rewritten model trained end to end, substitutes only,
to reproduce the original model's outputs (each batch's targets computed once, within the same
budget). Across processes (fxopt/distributed.py) sites go to whichever process is free, and
distillation is data parallel.

    >>> stats = train_sites(gm, candidates, batches, Layerwise(steps=200))   # doctest: +SKIP
    >>> stats["fc1"]                       # {"steps": 200, "loss_before": …, "loss_after": …}
"""

from __future__ import annotations

import copy
import math
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from torch import fx, nn
from torch.utils._pytree import tree_flatten, tree_leaves, tree_unflatten

from . import distributed
from .match import Site
from .substitutes import Substitute, constrain_
from .validate import Recorder, eval_mode

LOSSES = ("mse", "cosine")


@dataclass(frozen=True)
class Layerwise:
    """Settings of layer-wise training (steps = 0: off) and of the optional distillation."""

    steps: int = 0
    lr: float = 1e-3
    loss: str = "mse"
    distill_steps: int = 0
    distill_lr: float = 1e-4
    distill_sites: float = 0.0  # weight of the per-site targets in the distillation loss (0: outputs only)
    progress: bool = False  # rich progress bars, one per site

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"unknown layer-wise loss {self.loss!r} (known: {', '.join(LOSSES)})")
        if self.steps < 0 or self.distill_steps < 0 or not self.lr > 0 or not self.distill_lr > 0:
            raise ValueError("layer-wise steps must be ≥ 0 and learning rates > 0")
        if not self.distill_sites >= 0:
            raise ValueError("the weight of the per-site distillation targets must be ≥ 0")


def loss_fn(name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    def mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return (out - target).square().sum() / target.square().sum().clamp_min(1e-12)

    def cosine(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if target.dim() < 2:
            return 1 - F.cosine_similarity(out.flatten(), target.flatten(), dim=0)
        return 1 - F.cosine_similarity(out.flatten(1), target.flatten(1), dim=1).mean()

    return {"mse": mse, "cosine": cosine}[name]


def train_sites(gm: fx.GraphModule, candidates: Sequence[tuple[Site, nn.Module]], batches: Sequence[tuple],
                config: Layerwise, recorded: "Recordings | None" = None) -> dict[str, dict[str, float | int]]:
    """Train each substitute to reproduce its site's outputs on `batches` (cycled for config.steps).

    Returns, per site key, the steps taken and the mean loss over the first and the last
    `len(batches)` steps (one pass over the data each), in place since training only moves the
    substitutes' own parameters; the original graph is only read. `recorded`: the sites' values
    on `batches` where the caller has them already (`record`).
    """
    if not candidates or config.steps == 0 or not batches:
        return {}
    return _train(gm, candidates, batches, config, recorded)


def costliest_first(candidates: Sequence[tuple[Site, nn.Module]], recorded: "Recordings", config: Layerwise
                    ) -> list[int]:
    """Across the processes of the group (every one calls it alike): the candidates' indices, the
    costliest to train first, by the measured time of a training step on the first recorded batch
    (each process times a share of them). The order in which `fxopt optimize` hands sites out to
    processes (distributed.claims)."""
    rank, size = distributed.world()
    probed = [c for i, c in enumerate(candidates) if i % size == rank]
    costs = distributed.merged(dict(zip((site.key for site, _ in probed), _step_seconds(probed, recorded[0], config))))
    return sorted(range(len(candidates)), key=lambda i: (-costs[candidates[i][0].key], i))


def _step_seconds(candidates: Sequence[tuple[Site, nn.Module]], values: dict[fx.Node, torch.Tensor],
                  config: Layerwise, steps: int = 4) -> list[float]:
    """Seconds of one training step of each site, measured on copies (the fastest of `steps` after
    one warm-up): the cost by which sites are handed out to processes. FLOPs do not predict it: a
    narrow layer on a large image costs several times its FLOPs' share."""
    criterion, seconds = loss_fn(config.loss), []
    for site, module in candidates:
        trial = copy.deepcopy(module).train()
        opt = torch.optim.Adam(trial.parameters(), lr=config.lr)
        times = []
        for _ in range(steps + 1):
            start = time.perf_counter()
            try:
                loss = criterion(trial(values[site.input]), values[site.output].detach())
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            except Exception:  # it will fail in training too, at once
                break
            times.append(time.perf_counter() - start)
        seconds.append(min(times[1:], default=0.0))
    return seconds


def _train(gm: fx.GraphModule, candidates: Sequence[tuple[Site, nn.Module]], batches: Sequence[tuple],
           config: Layerwise, recorded: "Recordings | None") -> dict[str, dict[str, float | int]]:
    recorded = recorded if recorded is not None else record(gm, candidates, batches)
    fit_to_inputs(candidates, recorded)
    criterion = loss_fn(config.loss)
    optims = {site.key: torch.optim.Adam(module.parameters(), lr=config.lr) for site, module in candidates}
    scheds = {k: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=config.steps) for k, o in optims.items()}
    window = min(len(batches), config.steps)
    losses: dict[str, list[float]] = {site.key: [] for site, _ in candidates}
    failed: set[str] = set()
    # sites are independent: with every batch's values kept, one site at a time through all its steps
    # (its weights and optimizer state stay in cache: 6% faster on cnn9); streaming, all sites at
    # each step, so the graph runs once per step rather than once per site and step
    groups = [[c] for c in candidates] if recorded.kept_whole() else [list(candidates)]
    with _progress(config.progress, [site.key for site, _ in candidates], config.steps) as advance, \
            _training(m for _, m in candidates):
        for group, step in ((g, step) for g in groups for step in range(config.steps)):
            values = recorded[step % len(batches)]
            for site, module in group:
                if site.key in failed:
                    continue
                try:
                    loss = criterion(module(values[site.input]), values[site.output].detach())
                except Exception:  # validation reports why; training just leaves this site alone
                    failed.add(site.key)
                    continue
                if not torch.isfinite(loss):
                    failed.add(site.key)
                    continue
                optims[site.key].zero_grad(set_to_none=True)
                loss.backward()
                optims[site.key].step()
                constrain_([module])
                scheds[site.key].step()
                losses[site.key].append(loss.item())
                advance(site.key)
    return {
        key: {"steps": len(v), "loss": config.loss,
              "loss_before": _mean(v[:window]), "loss_after": _mean(v[-window:]), "curve": curve(v)}
        for key, v in losses.items() if key not in failed
    }


CACHE_BYTES = int(float(os.environ.get("FXOPT_LAYERWISE_CACHE_MB", 2048)) * 2**20)


def record(gm: fx.GraphModule, candidates: Sequence[tuple[Site, nn.Module]], batches: Sequence[tuple]) -> "Recordings":
    """The values at the candidates' sites (input and output) on each batch, as they are asked for."""
    return Recordings(gm, {n for site, _ in candidates for n in (site.input, site.output)}, batches)


class Recordings:
    """The sites' inputs and outputs on each batch, from the original graph. The graph runs once
    per batch and its values are kept while all batches' fit in CACHE_BYTES
    ($FXOPT_LAYERWISE_CACHE_MB, 2048); beyond that it runs again at every step (streaming: memory
    bounded by one batch). Either way every step sees the same values."""

    def __init__(self, gm: fx.GraphModule, keep: set[fx.Node], batches: Sequence[tuple], start: int = 0,
                 store: dict | None = None):
        self.gm, self.keep, self.batches, self.start = gm, keep, batches, start
        self.store = store if store is not None else {"kept": {}, "streaming": False}  # shared with tail()s

    def __len__(self) -> int:
        return len(self.batches) - self.start

    def kept_whole(self) -> bool:
        """Whether every batch's values stay in memory (judged from the first batch's size)."""
        return not self.store["streaming"] and (len(self) == 0 or self[0] is self.store["kept"].get(self.start))

    def tail(self, n: int) -> "Recordings":
        """The last `n` batches' recordings, sharing what is kept: its batch i is batch len(self) − n + i here."""
        return Recordings(self.gm, self.keep, self.batches, self.start + len(self) - n, self.store)

    def share_across_processes(self) -> None:
        """Every batch recorded once in the group instead of in each process: process r records
        batches r, r + size, … and then each is broadcast (`distributed.broadcast_tensors`); each
        process keeps them all, as it would have. Where they would not all be kept (streaming) or
        are not all tensors, every process goes on recording its own."""
        rank, size = distributed.world()
        named = {n.name: n for n in self.keep}
        mine = {j: self._record(j) for j in range(rank, len(self.batches), size)}
        fits = all(all(isinstance(v, torch.Tensor) for v in values.values())
                   and _bytes(list(values.values())) * len(self.batches) <= CACHE_BYTES for values in mine.values())
        agreed = torch.tensor([int(fits)])
        dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
        if not agreed.item():
            return
        for j in range(len(self.batches)):
            values = mine.get(j)
            shared = distributed.broadcast_tensors(None if values is None else {n.name: v for n, v in values.items()},
                                                   src=j % size)
            self.store["kept"][j] = values if values is not None else {named[k]: v for k, v in shared.items()}

    @torch.no_grad()
    def _record(self, j: int) -> dict[fx.Node, torch.Tensor]:
        rec = Recorder(self.gm, self.keep, stop=True)
        rec.run(*self.batches[j])
        return rec.values

    def __getitem__(self, i: int) -> dict[fx.Node, torch.Tensor]:
        j, kept = self.start + i, self.store["kept"]
        if self.store["streaming"]:
            return self._record(j)
        if j not in kept:
            values = self._record(j)
            if _bytes(list(values.values())) * len(self.batches) > CACHE_BYTES:
                self.store["streaming"] = True
                kept.clear()
                return values
            kept[j] = values
        return kept[j]


def _bytes(values) -> int:
    """Bytes of the tensors in `values` (any pytree)."""
    return sum(t.numel() * t.element_size() for t in tree_leaves(values) if isinstance(t, torch.Tensor))


@torch.no_grad()
def fit_to_inputs(candidates: Sequence[tuple[Site, nn.Module]], recorded: "Recordings") -> None:
    """Substitutes with a closed-form fit to their inputs (`fit_inputs(original layer, Gram
    matrix)`: lowrank) take it before the gradient steps: one pass over the recorded batches
    accumulates each site's input Gram matrix X·Xᵀ (in × in, float64), then each substitute refits."""
    fitting = [(site, m) for site, m in candidates if isinstance(m, Substitute) and m.fits_inputs]
    if not fitting:
        return
    grams: dict[str, torch.Tensor] = {}
    for i in range(len(recorded)):
        values = recorded[i]
        for site, _ in fitting:
            x = values[site.input].detach()
            x = x.reshape(-1, x.shape[-1]).double()
            grams[site.key] = grams.get(site.key, 0) + x.T @ x
    for site, module in fitting:
        module.fit_inputs(site.module, grams[site.key])


def distill(original: nn.Module, rewritten: fx.GraphModule, substitutes: Sequence[nn.Module],
            batches: Sequence[tuple], config: Layerwise,
            reference: tuple[fx.GraphModule, Sequence[tuple[fx.Node, nn.Module]]] | None = None,
            across_processes: bool = False) -> dict[str, float | int] | None:
    """Train the substitutes inside the rewritten model so that its outputs match the original
    model's (relative squared error over every floating-point output). Everything else in the
    rewritten model stays frozen and in eval mode (batch-norm statistics do not move).

    With `config.distill_sites` > 0 and `reference` (the traced graph before the rewrite, and
    pairs of a site's output node in it and the substitute that replaced the site), each substitute's
    output inside the rewritten model is also pulled towards its original layer's output on the
    same batch, weighted by `distill_sites` (the mean of the per-site relative squared errors):
    the layer-wise objective, on the inputs the rewritten model gives each layer instead of the
    original's, so errors do not pile up from layer to layer. The original's outputs then come
    from the reference graph's run (the trace computes what the model computes; end_to_end checks
    it). The targets of each batch are computed once and kept while all batches' fit the layer-wise
    cache budget (CACHE_BYTES); beyond it the original runs again at every step.

    `across_processes` (every process of the group calling it alike, on the same batches): data
    parallel, DistributedDataParallel over the rewritten model and each batch's rows split across
    the processes (`_Shards`). Each process's loss is its rows' squared error over the whole
    batch's target norm (one all-reduce of the sums), times the number of processes, so that DDP's
    mean of the gradients is the whole batch's gradient: the steps are those of one process, up to
    float summation order."""
    if config.distill_steps == 0 or not batches:
        return None
    # a head validated by recall (wta_hash) computes its top candidates and fills the rest with −inf:
    # a squared error does not fit it, so it stays as built (and its outputs' fill is not compared)
    fills = any(getattr(m, "validated_by", "error") == "recall" for m in substitutes)
    substitutes = [m for m in substitutes if getattr(m, "validated_by", "error") != "recall"]
    params = [p for m in substitutes for p in m.parameters()]
    if not params:
        return {"steps": 0, "reason": "no substitute to distil (wta_hash heads are left as built: they are "
                                      "measured by recall, which a squared error does not train)"}
    rank, size = distributed.world() if across_processes else (0, 1)
    ours = {id(p) for p in params}
    frozen = [p for p in rewritten.parameters() if id(p) not in ours and p.requires_grad]
    opt = torch.optim.Adam(params, lr=config.distill_lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=config.distill_steps)
    window = min(len(batches), config.distill_steps)
    per_site = config.distill_sites > 0 and reference is not None and bool(reference[1])
    outputs: dict[int, torch.Tensor] = {}
    hooks = [m.register_forward_hook(lambda mod, args, out, i=i: outputs.__setitem__(i, out))
             for i, (_, m) in enumerate(reference[1])] if per_site else []
    losses, site_losses = [], []
    for p in frozen:
        p.requires_grad_(False)
    try:
        with eval_mode(original), eval_mode(rewritten), _training(substitutes), \
                _progress(config.progress and rank == 0, ["distill"], config.distill_steps, "") as advance:
            model = nn.parallel.DistributedDataParallel(rewritten, **distributed.NO_BUFFER_SYNC) if size > 1 \
                else rewritten
            shards = _Shards(original, rank, size)
            kept: dict[int, tuple] | None = {}  # each batch's targets, while all batches' fit CACHE_BYTES
            for step in range(config.distill_steps):
                i = step % len(batches)
                batch = shards(i, batches[i])
                if kept is not None and i in kept:
                    targets, site_targets = kept[i]
                else:
                    targets, site_targets = _targets(original, reference if per_site else None, batch)
                    if kept is not None and _bytes((targets, site_targets)) * len(batches) <= CACHE_BYTES:
                        kept[i] = (targets, site_targets)
                    else:  # beyond the budget: the original runs at every step (memory: one batch)
                        kept = None
                outs = _float_leaves(model(*batch))
                pairs = list(zip(outs, targets)) + [(outputs[i], t) for i, t in enumerate(site_targets)]
                if fills:  # only where a head's fill can reach the outputs
                    pairs = [(o[o.isfinite()], t[o.isfinite()]) for o, t in pairs]
                errors = [(o - t).square().sum() for o, t in pairs]
                sums = torch.stack([e.detach().double() for e in errors] +
                                   [t.detach().double().square().sum() for _, t in pairs])
                if size > 1:  # the whole batch's squared errors (for the record) and target norms
                    dist.all_reduce(sums)
                norms = sums[len(pairs):].clamp_min(1e-12)
                relative = [e * size / n.to(e.dtype) for e, n in zip(errors, norms)]  # DDP averages: × size
                n_out = len(targets)
                loss = sum(relative[:n_out]) / max(n_out, 1)
                losses.append((sums[:n_out] / norms[:n_out]).mean().item() if n_out else 0.0)
                if per_site:
                    loss = loss + config.distill_sites * sum(relative[n_out:]) / len(site_targets)
                    site_losses.append((sums[n_out:len(pairs)] / norms[n_out:]).mean().item())
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                constrain_(substitutes)
                sched.step()
                outputs.clear()
                advance("distill")
    finally:
        for h in hooks:
            h.remove()
        for p in frozen:
            p.requires_grad_(True)
    stats = {"steps": len(losses), "loss_before": _mean(losses[:window]), "loss_after": _mean(losses[-window:]),
             "curve": curve(losses)}
    if size > 1:
        stats["processes"] = size
        stats["split_batches"] = shards.split
    if per_site:
        stats |= {"sites_weight": config.distill_sites, "site_loss_before": _mean(site_losses[:window]),
                  "site_loss_after": _mean(site_losses[-window:])}
    return stats


@torch.no_grad()
def _targets(original: nn.Module, reference: tuple[fx.GraphModule, Sequence[tuple[fx.Node, nn.Module]]] | None,
             batch: tuple) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """What distillation pulls towards on `batch`: the original's floating-point outputs, and with
    `reference` (the traced graph, pairs of a site's output node and its substitute) each site's
    original output, from one run of that graph."""
    if reference is None:
        return _float_leaves(original(*batch)), []
    graph, pairs = reference
    nodes = [n for n, _ in pairs]
    rec = Recorder(graph, set(nodes))
    return _float_leaves(rec.run(*batch)), [rec.values[n] for n in nodes]


class _Shards:
    """Each process's part of a batch for data-parallel distillation: its share of the rows
    (dimension 0 of every tensor input), or the whole batch on every process where the rows cannot
    be split. They can when every tensor input has the same number of rows, at least one per
    process, and the original model's outputs on this process's rows equal its outputs on the whole
    batch at those rows (checked once per batch, agreed by every process): a model whose samples
    do not interact in eval mode. A model that takes (sequence, batch, …) inputs fails the check and
    runs whole batches. Either way every step computes what one process would (`distill`)."""

    def __init__(self, original: nn.Module, rank: int, size: int):
        self.original, self.rank, self.size = original, rank, size
        self.parts: dict[int, tuple] = {}
        self.split = 0  # how many of the batches are split

    def __call__(self, i: int, batch: tuple) -> tuple:
        if self.size == 1:
            return batch
        if i not in self.parts:
            part = self._rows(batch)
            agreed = torch.tensor([int(part is not None)])
            dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
            self.parts[i] = part if agreed.item() else batch
            self.split += int(agreed.item())
        return self.parts[i]

    @torch.no_grad()
    def _rows(self, batch: tuple) -> tuple | None:
        leaves, spec = tree_flatten(batch)
        tensors = [t for t in leaves if isinstance(t, torch.Tensor)]
        rows = tensors[0].shape[0] if tensors and tensors[0].dim() else 0
        if rows < self.size or any(t.dim() == 0 or t.shape[0] != rows for t in tensors):
            return None
        lo, hi = self.rank * rows // self.size, (self.rank + 1) * rows // self.size
        part = tree_unflatten([t[lo:hi] if isinstance(t, torch.Tensor) else t for t in leaves], spec)
        whole, mine = _float_leaves(self.original(*batch)), _float_leaves(self.original(*part))
        for w, m in zip(whole, mine):
            if w.dim() == 0 or w.shape[0] != rows or m.shape != (hi - lo, *w.shape[1:]):
                return None
            w = w[lo:hi]
            scale = w[w.isfinite()].abs().max().item() if w.isfinite().any() else 0.0
            if not torch.isclose(m, w, rtol=1e-3, atol=1e-4 * scale + 1e-7).all():
                return None
        return part if len(whole) == len(mine) else None


def curve(losses: Sequence[float], points: int = 50) -> list[float]:
    """The loss curve for reports: at most `points` values, each the mean of consecutive steps."""
    if not losses:
        return []
    size = math.ceil(len(losses) / points)
    return [round(_mean(losses[i:i + size]), 6) for i in range(0, len(losses), size)]


def _float_leaves(value) -> list[torch.Tensor]:
    return [t for t in tree_leaves(value) if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values) if values else math.nan


@contextmanager
def _training(modules: Iterable[nn.Module]):
    """The substitutes in train mode (ours: `train()` is allowed), back to eval mode after."""
    modules = list(modules)
    for m in modules:
        m.train()
    try:
        yield
    finally:
        for m in modules:
            m.eval()


@contextmanager
def _progress(enabled: bool, names: Sequence[str], steps: int, prefix: str = "layer-wise "):
    """Yields advance(name): one rich progress bar per name, or nothing when disabled."""
    if not enabled:
        yield lambda key: None
        return
    columns = (TextColumn(prefix + "{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TimeElapsedColumn())
    with Progress(*columns, transient=False) as bars:
        ids = {name: bars.add_task(name, total=steps) for name in names}
        yield lambda key: bars.advance(ids[key])
