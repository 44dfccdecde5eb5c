"""Layer-wise training of substitutes against the original layers' outputs (Zeng & Tian 2017).

A lossy substitute starts from `from_original` (an SVD-type fit of the weight), which minimises
the weight error, not the error on the data the layer sees. Layer-wise training closes that gap:
each substitute is trained, independently of the others, to map the inputs its original layer
receives on calibration data to the outputs the original layer produces. A substitute that can
solve that least-squares problem in closed form (`fit_inputs`: lowrank's SVD of the weight
whitened by the inputs' Gram matrix) does so first, from one pass over the data; the gradient
steps then start from the optimum of the squared error.

Every step, every site takes one optimiser step on one calibration batch: the original graph's
values at the sites' inputs and outputs on that batch (an fx `Interpreter` that keeps only those).
They are recorded once per batch and kept while all batches' fit in a budget
($FXOPT_LAYERWISE_CACHE_MB, 2 GiB); beyond it the graph runs again at every step, so memory stays
bounded by one batch. Losses are scale-free, so one learning rate fits every site:

    mse     ‖y − t‖² / ‖t‖²               (relative squared error)
    cosine  1 − mean over samples of cos(y, t)

`distill` is the optional last step: the rewritten model trained end to end, substitutes only,
to reproduce the original model's outputs.

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
import torch.nn.functional as F
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from torch import fx, nn
from torch.utils._pytree import tree_leaves

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
                config: Layerwise) -> dict[str, dict[str, float | int]]:
    """Train each substitute to reproduce its site's outputs on `batches` (cycled for config.steps).

    Returns, per site key, the steps taken and the mean loss over the first and the last
    `len(batches)` steps (one pass over the data each), in place since training only moves the
    substitutes' own parameters; the original graph is only read.
    """
    if not candidates or config.steps == 0 or not batches:
        return {}
    return _train(gm, candidates, batches, config)


def split(gm: fx.GraphModule, candidates: Sequence[tuple[Site, nn.Module]], batches: Sequence[tuple],
          config: Layerwise) -> list[int]:
    """Across the processes of the group (every one calls it alike): the process that trains each
    site, balanced by the measured time of a training step (each process times a share of the
    sites; fxopt.distributed.balance)."""
    rank, size = distributed.world()
    probed = [c for i, c in enumerate(candidates) if i % size == rank]
    costs = distributed.merged(dict(zip((site.key for site, _ in probed), _step_seconds(gm, probed, batches, config))))
    return distributed.balance([costs[site.key] for site, _ in candidates], size)


def _step_seconds(gm: fx.GraphModule, candidates: Sequence[tuple[Site, nn.Module]], batches: Sequence[tuple],
                  config: Layerwise, steps: int = 2) -> list[float]:
    """Seconds of one training step of each site, measured on copies (the fastest of `steps` after
    one warm-up): what splitting the sites across processes balances. FLOPs do not predict it: a
    narrow layer on a large image costs several times its FLOPs' share."""
    keep = {n for site, _ in candidates for n in (site.input, site.output)}
    values = _Recordings(gm, keep, batches[:1])[0]
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
           config: Layerwise) -> dict[str, dict[str, float | int]]:
    keep = {n for site, _ in candidates for n in (site.input, site.output)}
    recorded = _Recordings(gm, keep, batches)
    fit_to_inputs(candidates, recorded)
    criterion = loss_fn(config.loss)
    optims = {site.key: torch.optim.Adam(module.parameters(), lr=config.lr) for site, module in candidates}
    scheds = {k: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=config.steps) for k, o in optims.items()}
    window = min(len(batches), config.steps)
    losses: dict[str, list[float]] = {site.key: [] for site, _ in candidates}
    failed: set[str] = set()
    with _progress(config.progress, [site.key for site, _ in candidates], config.steps) as advance, \
            _training(m for _, m in candidates):
        for step in range(config.steps):
            values = recorded[step % len(batches)]
            for site, module in candidates:
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


class _Recordings:
    """The sites' inputs and outputs on each batch, from the original graph. The graph runs once
    per batch and its values are kept while all batches' fit in CACHE_BYTES
    ($FXOPT_LAYERWISE_CACHE_MB, 2048); beyond that it runs again at every step (streaming: memory
    bounded by one batch). Either way every step sees the same values."""

    def __init__(self, gm: fx.GraphModule, keep: set[fx.Node], batches: Sequence[tuple]):
        self.gm, self.keep, self.batches = gm, keep, batches
        self.kept: dict[int, dict[fx.Node, torch.Tensor]] | None = {}

    @torch.no_grad()
    def _record(self, i: int) -> dict[fx.Node, torch.Tensor]:
        rec = Recorder(self.gm, self.keep)
        rec.run(*self.batches[i])
        return rec.values

    def __getitem__(self, i: int) -> dict[fx.Node, torch.Tensor]:
        if self.kept is None:
            return self._record(i)
        if i not in self.kept:
            values = self._record(i)
            size = sum(t.numel() * t.element_size() for t in tree_leaves(list(values.values()))
                       if isinstance(t, torch.Tensor))
            if size * len(self.batches) > CACHE_BYTES:
                self.kept = None
                return values
            self.kept[i] = values
        return self.kept[i]


@torch.no_grad()
def fit_to_inputs(candidates: Sequence[tuple[Site, nn.Module]], recorded: "_Recordings") -> None:
    """Substitutes with a closed-form fit to their inputs (`fit_inputs(original layer, Gram
    matrix)`: lowrank) take it before the gradient steps: one pass over the recorded batches
    accumulates each site's input Gram matrix X·Xᵀ (in × in, float64), then each substitute refits."""
    fitting = [(site, m) for site, m in candidates if isinstance(m, Substitute) and m.fits_inputs]
    if not fitting:
        return
    grams: dict[str, torch.Tensor] = {}
    for i in range(len(recorded.batches)):
        values = recorded[i]
        for site, _ in fitting:
            x = values[site.input].detach()
            x = x.reshape(-1, x.shape[-1]).double()
            grams[site.key] = grams.get(site.key, 0) + x.T @ x
    for site, module in fitting:
        module.fit_inputs(site.module, grams[site.key])


def distill(original: nn.Module, rewritten: fx.GraphModule, substitutes: Sequence[nn.Module],
            batches: Sequence[tuple], config: Layerwise,
            reference: tuple[fx.GraphModule, Sequence[tuple[fx.Node, nn.Module]]] | None = None
            ) -> dict[str, float | int] | None:
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
    it)."""
    params = [p for m in substitutes for p in m.parameters()]
    if not params or config.distill_steps == 0 or not batches:
        return None
    ours = {id(p) for p in params}
    frozen = [p for p in rewritten.parameters() if id(p) not in ours and p.requires_grad]
    criterion = loss_fn("mse")
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
                _progress(config.progress, ["distill"], config.distill_steps, "") as advance:
            for step in range(config.distill_steps):
                batch = batches[step % len(batches)]
                with torch.no_grad():
                    if per_site:
                        graph, pairs = reference
                        nodes = [n for n, _ in pairs]
                        rec = Recorder(graph, set(nodes))
                        targets = _float_leaves(rec.run(*batch))
                        site_targets = [rec.values[n] for n in nodes]
                    else:
                        targets = _float_leaves(original(*batch))
                outs = _float_leaves(rewritten(*batch))
                loss = sum(criterion(o, t) for o, t in zip(outs, targets)) / max(len(targets), 1)
                losses.append(loss.item())
                if per_site:
                    site_loss = sum(criterion(outputs[i], t) for i, t in enumerate(site_targets)) / len(site_targets)
                    site_losses.append(site_loss.item())
                    loss = loss + config.distill_sites * site_loss
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
    if per_site:
        stats |= {"sites_weight": config.distill_sites, "site_loss_before": _mean(site_losses[:window]),
                  "site_loss_after": _mean(site_losses[-window:])}
    return stats


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
