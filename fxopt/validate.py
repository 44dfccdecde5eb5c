"""Numerical validation: per site and end to end.

Per site, the substitute receives exactly the input the original layer received (recorded by an
fx `Interpreter` run of the original graph), and its output is compared with the original layer's
output. End to end, the rewritten model is compared with the user's original model (not with our
trace of it, so tracing mistakes show up too). Errors are accumulated over all batches (example
inputs, then calibration batches) in float64:

    max_abs   max |ref − out|
    rel_l2    ‖ref − out‖₂ / ‖ref‖₂
    sqnr_db   10·log10(‖ref‖² / ‖ref − out‖²)   (None when the outputs are identical: infinite)
    cosine    ⟨ref, out⟩ / (‖ref‖·‖out‖)
    top1_agreement   share of rows whose argmax agrees (classifier-shaped outputs: N × C, C ≥ 2)

A substitute that computes only some outputs exactly and fills the others (`wta_hash`: the
candidate rows, −inf elsewhere; it says so with `validated_by = "recall"`) is measured by what it
promises instead (`RecallStats`):

    recall_at_1      share of inputs whose dense top-1 output is among the outputs computed exactly
    recall_at_5      share of the dense top-5 outputs computed exactly, averaged over inputs
    computed_share   share of all outputs computed exactly

End to end, outputs filled with −inf where the original's are finite have no meaningful SQNR or
relative error: those metrics are left out (a tolerance on them is then violated, never passed
silently) and top-1 agreement is still measured. NaN anywhere is a failure. A reference that is
numerically zero (|ref| ≤ 1e-10 everywhere: e.g. a randomly initialised network whose activations
vanish) or constant anchors no relative metric: unless the outputs agree exactly, only `max_abs`
is kept, with `degenerate_reference` saying why (again, a tolerance on the others is violated).
A model with several outputs (tuple, dict) gets each output's metrics too (`outputs`).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Iterable, Sequence

import torch
from torch import fx, nn
from torch.utils._pytree import keystr, tree_flatten_with_path, tree_leaves

from .match import Site
from .substitutes import Substitute


ZERO = 1e-10  # a reference whose largest magnitude is at most this is numerically zero (fp32 noise)


class ErrorStats:
    """Running error statistics between a reference and a candidate, over many tensors."""

    def __init__(self):
        self.ref_sq = self.out_sq = self.diff_sq = self.dot = 0.0
        self.max_abs = 0.0
        self.agree = self.rows = 0
        self.nonfinite = False  # NaN or ±inf where the reference is finite (but not the −inf fill below)
        self.filled = False  # −inf where the reference is finite: outputs a sparse substitute did not compute
        self.ref_min, self.ref_max, self.ref_count = math.inf, -math.inf, 0  # finite reference values seen

    def update(self, ref: torch.Tensor, out: torch.Tensor, classifier: bool = False) -> None:
        if ref.shape != out.shape:
            raise ValueError(f"shape mismatch: reference {tuple(ref.shape)} vs {tuple(out.shape)}")
        r, o = ref.detach().double(), out.detach().double()
        if classifier:
            self.agree += (r.argmax(-1) == o.argmax(-1)).sum().item()
            self.rows += r.shape[0]
        finite_ref = torch.isfinite(r)
        seen = r if finite_ref.all() else r[finite_ref]  # a copy only when the reference has inf/NaN
        if seen.numel():
            lo, hi = torch.aminmax(seen)
            self.ref_min, self.ref_max = min(self.ref_min, lo.item()), max(self.ref_max, hi.item())
            self.ref_count += seen.numel()
        bad = ~torch.isfinite(o) & finite_ref
        if bad.any():
            filled = bad & (o == -math.inf)
            self.filled |= bool(filled.any())
            self.nonfinite |= bool((bad & ~filled).any())
            return
        d = r - o
        self.ref_sq += r.square().sum().item()
        self.out_sq += o.square().sum().item()
        self.diff_sq += d.square().sum().item()
        self.dot += (r * o).sum().item()
        self.max_abs = max(self.max_abs, d.abs().max().item() if d.numel() else 0.0)

    def degenerate(self) -> str | None:
        """Why the reference cannot anchor relative metrics: numerically zero or constant, or None."""
        if not self.ref_count:
            return None
        scale = max(abs(self.ref_min), abs(self.ref_max))
        if scale <= ZERO:
            return f"numerically zero (max |reference| {scale:.2g})"
        if self.ref_count > 1 and self.ref_max - self.ref_min <= 1e-6 * scale:
            return f"constant ({self.ref_min:.4g})"
        return None

    def metrics(self) -> dict[str, float | str | None]:
        top1 = {"top1_agreement": self.agree / self.rows} if self.rows else {}
        if self.nonfinite:
            nan = float("nan")
            return {"max_abs": nan, "rel_l2": nan, "sqnr_db": nan, "cosine": nan}
        if self.filled:
            return top1
        degenerate = self.degenerate()
        if degenerate and self.diff_sq > 0:  # relative to nothing: only the absolute error means something
            return {"max_abs": self.max_abs, "degenerate_reference": degenerate}
        rel = math.sqrt(self.diff_sq / self.ref_sq) if self.ref_sq > 0 else (0.0 if self.diff_sq == 0 else math.inf)
        sqnr = None if self.diff_sq == 0 else (10 * math.log10(self.ref_sq / self.diff_sq) if self.ref_sq > 0 else -math.inf)
        norms = math.sqrt(self.ref_sq * self.out_sq)
        cosine = self.dot / norms if norms > 0 else (1.0 if self.diff_sq == 0 else 0.0)
        flag = {"degenerate_reference": degenerate} if degenerate else {}
        return {"max_abs": self.max_abs, "rel_l2": rel, "sqnr_db": sqnr, "cosine": cosine} | top1 | flag


class RecallStats:
    """Recall of the dense top-1 and top-5 outputs among those a sparse substitute computed, over
    many tensors (..., C). An output counts as computed where it equals the reference's (to fp32
    rounding of a reordered sum), so no knowledge of the fill value is needed."""

    def __init__(self):
        self.inputs = self.hit1 = 0
        self.hit5 = self.computed = 0.0
        self.nonfinite = False

    def update(self, ref: torch.Tensor, out: torch.Tensor, classifier: bool = False) -> None:
        if ref.shape != out.shape:
            raise ValueError(f"shape mismatch: reference {tuple(ref.shape)} vs {tuple(out.shape)}")
        r, o = ref.detach().reshape(-1, ref.shape[-1]).float(), out.detach().reshape(-1, ref.shape[-1]).float()
        self.nonfinite |= bool(o.isnan().any() or (o == math.inf).any())
        hit = torch.isclose(o, r, rtol=1e-4, atol=1e-5 * max(1.0, r.abs().max().item()))
        top = r.topk(min(5, r.shape[1]), dim=1).indices
        self.hit1 += hit.gather(1, top[:, :1]).sum().item()
        self.hit5 += hit.gather(1, top).float().mean(1).sum().item()
        self.computed += hit.float().mean(1).sum().item()
        self.inputs += r.shape[0]

    def metrics(self) -> dict[str, float | None]:
        if self.nonfinite:
            return {"recall_at_1": float("nan"), "recall_at_5": float("nan"), "computed_share": float("nan")}
        n = max(self.inputs, 1)
        return {"recall_at_1": self.hit1 / n, "recall_at_5": self.hit5 / n, "computed_share": self.computed / n}


def stats_for(module: nn.Module) -> ErrorStats | RecallStats:
    """The statistics that fit a module: its `validated_by` where it is a substitute."""
    return RecallStats() if isinstance(module, Substitute) and module.validated_by == "recall" else ErrorStats()


class _Recorded(Exception):
    """Every kept value is in: the rest of the graph need not run."""


class Recorder(fx.Interpreter):
    """Runs a graph and keeps the values of the nodes in `keep`. With `stop=True` it stops at the
    last of them (run() then returns None): a site's values need not wait for the model's head."""

    def __init__(self, gm: fx.GraphModule, keep: set[fx.Node], stop: bool = False):
        super().__init__(gm)
        self.keep, self.values, self.stop = keep, {}, stop

    def run_node(self, n: fx.Node):
        value = super().run_node(n)
        if n in self.keep:
            self.values[n] = value
            if self.stop and len(self.values) == len(self.keep):
                self.extra_traceback = False  # fx would annotate the exception with the graph: slow
                raise _Recorded
        return value

    def run(self, *args, **kwargs):
        try:
            return super().run(*args, **kwargs)
        except _Recorded:
            return None


@torch.no_grad()
def site_errors(gm: fx.GraphModule, pairs: Sequence[tuple[Site, nn.Module]], batches: Sequence[tuple],
                recorded: Sequence[dict[fx.Node, torch.Tensor]] | None = None) -> dict[str, dict[str, float | None]]:
    """Per-site error of each substitute against the original layer, on identical inputs.
    `recorded`: the sites' values on each batch where the caller has them (layerwise.record)."""
    stats = {site.key: stats_for(module) for site, module in pairs}
    failed: dict[str, str] = {}
    keep = {n for site, _ in pairs for n in (site.input, site.output)}
    for i, batch in enumerate(batches):
        if recorded is not None:
            values = recorded[i]
        else:
            rec = Recorder(gm, keep, stop=True)
            rec.run(*batch)
            values = rec.values
        for site, module in pairs:
            if site.key in failed:
                continue
            try:
                stats[site.key].update(values[site.output], module(values[site.input]))
            except Exception as exc:  # a substitute that cannot run on this input is rolled back
                failed[site.key] = f"substitute failed on the site's input: {type(exc).__name__}: {exc}"
    return {key: ({"failed": failed[key]} if key in failed else s.metrics()) for key, s in stats.items()}


def is_classifier_output(value) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() == 2 and value.shape[1] >= 2 \
        and value.is_floating_point()


@torch.no_grad()
def end_to_end(original: nn.Module, rewritten: nn.Module, batches: Iterable[tuple]) -> dict[str, Any]:
    """Error of the rewritten model's outputs against the original model's, over all batches:
    the aggregate metrics over every floating-point output, and, when the model returns more than
    one, `outputs`: each one's own metrics under its name (`[0]`, `['boxes']`, …)."""
    total, per = ErrorStats(), {}
    with eval_mode(original):
        for batch in batches:
            ref, spec = tree_flatten_with_path(original(*batch))
            out = tree_leaves(rewritten(*batch))
            if len(ref) != len(out):
                raise ValueError(f"the rewritten model returns {len(out)} outputs, the original {len(ref)}")
            floats = [(keystr(path) or "output", r, o) for (path, r), o in zip(ref, out)
                      if isinstance(r, torch.Tensor) and r.is_floating_point()]
            classifier = len(ref) == 1 and is_classifier_output(ref[0][1])
            for name, r, o in floats:
                total.update(r, o, classifier)
                if len(floats) > 1:
                    per.setdefault(name, ErrorStats()).update(r, o, is_classifier_output(r))
    metrics: dict[str, Any] = total.metrics()
    if per:
        metrics["outputs"] = [{"name": name, **stats.metrics()} for name, stats in per.items()]
    return metrics


@contextmanager
def eval_mode(model: nn.Module):
    """Inference mode for a measurement, and the user's model left in the mode it was found in,
    module by module (a model in train mode may hold submodules in eval mode, and `train()`
    would switch them all). The flags are set directly: a module from `torch.export` (every
    model traced by the export fallback) refuses `eval()`, its graph having the mode it was
    exported in baked in."""
    modes = [(m, m.training) for m in model.modules()]
    for m, _ in modes:
        m.training = False
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training
