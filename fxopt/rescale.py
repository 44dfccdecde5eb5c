"""Kernel rescaling (Porto Buarque de Gusmão et al., "Fast Training of Convolutional Neural Networks
via Kernel Rescaling", 2016): train a CNN first at a lower input resolution with smaller kernels,
then carry the kernels to full resolution and refine there.

The spatial scaling property of convolution makes the two resolutions interchangeable: for a
smooth image x and a kernel k, downsampling the image by s and the kernel by s (keeping the sum
of its taps, since each low-resolution tap stands for s² full-resolution ones) gives the
downsampled response, conv(↓x, ↓k) ≈ ↓conv(x, k).

`down(model, example_inputs, factor, rules)` rewrites the whole model (traced with torch.fx):

* each convolution a rule claims gets a kernel of about k/s taps per axis (odd kernels stay odd:
  5 → 3, 7 → 5 at s = 2), resampled by ↓ = U⁺ (below); 'same' padding stays 'same', other
  padding scales with the kernel; stride and dilation are kept, so every feature map shrinks by s;
* kernels too small to shrink (3×3 at s = 2, 1×1) are kept, with the reason in the records;
* a Linear that reads a flattened feature map gets its weight resampled over the map's positions
  to the new map size (sum-preserving too); pooling and adaptive pooling need no change;
* the expected input size is recorded, and the model is shape-checked at that size.

`up(low, like=model)` maps the weights back. ↓ (D) gives low tap τ the full taps around s·τ with
tent weights (it keeps the sum of the taps); ↑ (U) is its pseudo-inverse, so ↓(↑(k)) = k
exactly: a kernel trained at low resolution and carried up computes, on smooth inputs, what it
computed below, and ↑(↓(k)) is the projection of k onto the kernels ↑ can produce.
`check(...)` measures, per rescaled layer, the error of conv(↓x, ↓k) against ↓conv(x, k) on
smooth inputs, and the model's output after ↓ then ↑ against the original's.

    >>> low = down(model, (x,), factor=2)          # a new model for inputs of half the size
    >>> train(low.model, F.interpolate(x, scale_factor=0.5, mode="area"))
    >>> full = up(low, like=model)                 # the original architecture, kernels carried up
    >>> recalibrate(full, batches)                 # batch-norm statistics of the full-resolution maps

`schedule(...)` runs it all (down, low epochs, up, recalibrate, full epochs) and times each phase.
Kernels below `min_kernel` (3×3) cannot shrink: they run unchanged on maps s times coarser, and
carried up they read features at the wrong scale; benchmarks/rescale_cnn.py measures both kinds.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import fx, nn

from . import rules as rules_mod
from .errors import FxoptError, first_line
from .trace import propagate_shapes


# --- the resampling operators ------------------------------------------------------------------

def downsample_matrix(large: int, small: int, factor: float, dtype=torch.float64) -> torch.Tensor:
    """D (small × large): low tap τ gathers the full taps t around s·τ with tent weights
    max(0, 1 − |t − s·τ|/s) (positions centred on the kernel's middle). The tents of taps s apart
    sum to 1 at every t (columns at the ends are normalised to 1 too), so D keeps the sum of the
    taps: each low-resolution tap stands for the full-resolution taps it covers."""
    t = torch.arange(large, dtype=dtype) - (large - 1) / 2
    tau = torch.arange(small, dtype=dtype) - (small - 1) / 2
    d = (1 - (t[None, :] - factor * tau[:, None]).abs() / factor).clamp_min(0)
    return d / d.sum(0, keepdim=True).clamp_min(1e-12)  # end taps past the last tent: shared out whole too


def upsample_matrix(small: int, large: int, factor: float, dtype=torch.float64) -> torch.Tensor:
    """U (large × small) = D⁺: D·U = I, so a kernel carried up and back down is unchanged."""
    return torch.linalg.pinv(downsample_matrix(large, small, factor, dtype))


def resample(w: torch.Tensor, size: Sequence[int], dims: Sequence[int], factor: float) -> torch.Tensor:
    """Resample the axes `dims` of w to `size`: D where an axis shrinks, U where it grows."""
    out = w.detach().double()
    for dim, n in zip(dims, size):
        cur = out.shape[dim]
        if cur == n:
            continue
        m = upsample_matrix(cur, n, factor) if n > cur else downsample_matrix(cur, n, factor)
        out = torch.movedim(torch.tensordot(m, torch.movedim(out, dim, 0), dims=1), 0, dim)
    return out.to(w.dtype)


def smaller_kernel(k: int, factor: float) -> int:
    """Taps per axis at 1/factor resolution: odd kernels stay odd (5 → 3, 7 → 5, 11 → 7 at 2)."""
    if k % 2:
        return 2 * math.floor((k - 1) / (2 * factor) + 0.5) + 1
    return max(1, round(k / factor))


def downsample_input(x: torch.Tensor, factor: float) -> torch.Tensor:
    """An image batch at 1/factor resolution (area averaging: what a coarser sensor would see)."""
    size = [max(1, round(n / factor)) for n in x.shape[2:]]
    return F.interpolate(x, size=size, mode="area")


# --- records ------------------------------------------------------------------------------------

@dataclass
class LayerRecord:
    name: str
    kind: str  # conv | linear-after-flatten
    status: str  # rescaled | kept
    reason: str | None = None
    before: dict[str, Any] = field(default_factory=dict)  # kernel/stride/padding or in_features, map size
    after: dict[str, Any] = field(default_factory=dict)
    error: float | None = None  # conv(↓x, ↓k) against ↓conv(x, k) on smooth inputs (relative L2)


@dataclass
class Rescaled:
    """A model rewritten for another input resolution, and what was done to each layer."""

    model: fx.GraphModule
    factor: float
    input_shapes: list[tuple[int, ...]]  # what the rescaled model expects
    records: list[LayerRecord]

    def report(self) -> dict[str, Any]:
        from dataclasses import asdict

        return {"factor": self.factor, "input_shapes": self.input_shapes,
                "layers": [asdict(r) for r in self.records]}


# --- the rewrite ---------------------------------------------------------------------------------

def _trace(model: nn.Module, inputs: tuple) -> fx.GraphModule:
    try:
        gm = fx.symbolic_trace(copy.deepcopy(model))
    except Exception as exc:
        raise FxoptError(f"rescale: cannot trace {type(model).__name__} with torch.fx: {first_line(exc)}") from None
    try:
        propagate_shapes(gm, inputs)
    except Exception as exc:
        raise FxoptError(f"rescale: {type(model).__name__} fails on its example inputs: {first_line(exc)}") from None
    return gm


def _flatten_source(node: fx.Node, gm: fx.GraphModule) -> fx.Node | None:
    """The 4-D feature map a Linear node reads through a flatten, if it does."""
    arg = node.args[0] if node.args else None
    if not isinstance(arg, fx.Node):
        return None
    flat = (arg.op == "call_function" and arg.target is torch.flatten) or \
        (arg.op == "call_module" and isinstance(gm.get_submodule(arg.target), nn.Flatten)) or \
        (arg.op == "call_method" and arg.target in ("flatten", "view", "reshape"))
    src = arg.args[0] if flat and arg.args else None
    meta = src.meta.get("tensor_meta") if isinstance(src, fx.Node) else None
    return src if meta is not None and len(meta.shape) == 4 else None


def _claims(gm: fx.GraphModule, ruleset: rules_mod.RescaleRules) -> dict[str, rules_mod.RescaleRule | str]:
    """Conv layer name → the rule that claims it, or the reason none does."""
    from .match import choose_rules, find_sites

    return {d.site.name: d.rule or d.reason for d in choose_rules(find_sites(gm), ruleset)
            if d.site.form == "module" and d.site.op in ("conv1d", "conv2d")}


def down(model: nn.Module, example_inputs: tuple, factor: float = 2.0,
         rules: str | rules_mod.RescaleRules = "rescale") -> Rescaled:
    """`model` rewritten for inputs `factor` times smaller per spatial axis (see the module doc)."""
    if not factor > 1:
        raise FxoptError(f"rescale: factor must be greater than 1, got {factor}")
    shapes = [tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__ for x in example_inputs]
    if not shapes or not all(isinstance(s, tuple) and len(s) == 4 for s in shapes):
        raise FxoptError(f"rescale: expects image batches (N, C, H, W) as example inputs, got {shapes}")
    ruleset = rules_mod.load_rescale(rules)
    gm = _trace(model, example_inputs)
    claims = _claims(gm, ruleset)
    small_inputs = [downsample_input(x, factor) for x in example_inputs]
    low = copy.deepcopy(gm)
    records = []
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        module = gm.get_submodule(node.target)
        if isinstance(module, nn.Conv2d):
            records.append(_down_conv(low, node.target, module, factor, claims.get(node.target, "no rule")))
    # Linear layers after a flatten: their input size follows the feature map's new size.
    for node in low.graph.nodes:
        if node.op != "call_module" or not isinstance(low.get_submodule(node.target), nn.Linear):
            continue
        src = _flatten_source(node, gm)
        if src is None:
            continue
        full_shape = tuple(src.meta["tensor_meta"].shape[1:])
        low_shape = _shape_at(low, small_inputs, src.name)
        records.append(_down_linear(low, node.target, full_shape, low_shape))
    try:
        propagate_shapes(low, small_inputs)
    except Exception as exc:
        raise FxoptError(f"rescale: the rescaled model fails at {[tuple(x.shape) for x in small_inputs]}: "
                         f"{first_line(exc)}") from None
    low.recompile()
    return Rescaled(low, factor, [tuple(x.shape) for x in small_inputs], records)


def _shape_at(gm: fx.GraphModule, inputs: list, node_name: str) -> tuple[int, ...]:
    """The shape (without batch) of one node's output when gm runs on `inputs` (the run stops
    there: what follows may not fit the new sizes yet)."""

    class Found(Exception):
        shape: tuple[int, ...] = ()

    class Probe(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n.name == node_name:
                found = Found()
                found.shape = tuple(out.shape[1:])
                raise found
            return out

    try:
        with torch.no_grad():
            Probe(gm).run(*inputs)
    except Found as found:
        return found.shape
    except Exception as exc:
        raise FxoptError(f"rescale: the rescaled model fails before {node_name}: {first_line(exc)}") from None
    raise FxoptError(f"rescale: node {node_name} did not run")


def _geometry(conv: nn.Conv2d) -> dict[str, Any]:
    return {"kernel": list(conv.kernel_size), "stride": list(conv.stride), "padding": list(conv.padding),
            "dilation": list(conv.dilation)}


def _down_conv(low: fx.GraphModule, name: str, conv: nn.Conv2d, factor: float,
               claim: rules_mod.RescaleRule | str) -> LayerRecord:
    rec = LayerRecord(name, "conv", "kept", before=_geometry(conv))
    if isinstance(claim, str):
        rec.reason = claim
        return rec
    min_kernel = claim.min_kernel  # the claiming rule's own setting
    if isinstance(conv.padding, str) or conv.padding_mode != "zeros":
        rec.reason = f"padding {conv.padding!r}/{conv.padding_mode} is not rescaled"
        return rec
    kernel = [smaller_kernel(k, factor) if k >= min_kernel else k for k in conv.kernel_size]
    if kernel == list(conv.kernel_size):
        rec.reason = f"kernel {tuple(conv.kernel_size)} too small to rescale (min_kernel {min_kernel})"
        return rec
    padding = [_padding(p, k, k2, d) for p, k, k2, d in zip(conv.padding, conv.kernel_size, kernel, conv.dilation)]
    new = nn.Conv2d(conv.in_channels, conv.out_channels, kernel, conv.stride, padding, conv.dilation, conv.groups,
                    conv.bias is not None, dtype=conv.weight.dtype, device=conv.weight.device)
    with torch.no_grad():
        new.weight.copy_(resample(conv.weight, kernel, (2, 3), factor))
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    low.set_submodule(name, new)
    rec.status, rec.after = "rescaled", _geometry(new)
    return rec


def _padding(p: int, k: int, k2: int, d: int) -> int:
    if 2 * p == d * (k - 1):  # 'same' stays 'same'
        return d * (k2 - 1) // 2
    return round(p * (k2 - 1) / (k - 1)) if k > 1 else p


def _down_linear(low: fx.GraphModule, name: str, full: tuple[int, ...], small: tuple[int, ...]) -> LayerRecord:
    lin = low.get_submodule(name)
    rec = LayerRecord(name, "linear-after-flatten", "kept", before={"in_features": lin.in_features, "map": list(full)})
    if full == small:
        rec.reason = "the feature map it reads keeps its size"
        return rec
    low.set_submodule(name, _resized_linear(lin, full, small))
    rec.status, rec.after = "rescaled", {"in_features": math.prod(small), "map": list(small)}
    return rec


def _resized_linear(lin: nn.Linear, full: tuple[int, ...], small: tuple[int, ...]) -> nn.Linear:
    """The Linear reading a (C, h, w) map instead of (C, H, W): weights resampled over positions;
    sum-preserving per output, as each new position stands for H·W/(h·w) old ones."""
    w = lin.weight.detach().reshape(lin.out_features, *full)
    new = nn.Linear(math.prod(small), lin.out_features, lin.bias is not None,
                    dtype=lin.weight.dtype, device=lin.weight.device)
    with torch.no_grad():
        factor = full[1] / small[1]  # the map's own ratio (sizes round)
        new.weight.copy_(resample(w, small[1:], (2, 3), factor).reshape(lin.out_features, -1))
        if lin.bias is not None:
            new.bias.copy_(lin.bias)
    return new


def up(low: Rescaled, like: nn.Module) -> nn.Module:
    """A copy of `like` (the full-resolution architecture) carrying `low`'s trained weights:
    rescaled kernels and flattened-map Linear weights mapped up with U, every other parameter
    and buffer copied as is."""
    full = copy.deepcopy(like)
    low_state = low.model.state_dict()
    shapes = {r.name: r for r in low.records if r.status == "rescaled"}
    with torch.no_grad():
        for key, target in full.state_dict().items():
            if key not in low_state:  # a parameter the traced model never used
                continue
            value = low_state[key]
            layer = key.rpartition(".")[0]
            if layer in shapes and key.endswith("weight") and value.shape != target.shape:
                rec = shapes[layer]
                if rec.kind == "conv":
                    value = resample(value, target.shape[2:], (2, 3), low.factor)
                else:
                    c, h, w = rec.before["map"]
                    small = value.reshape(value.shape[0], *rec.after["map"])
                    value = resample(small, (h, w), (2, 3), h / rec.after["map"][1]).reshape(target.shape)
            target.copy_(value)
    return full


# --- validation ----------------------------------------------------------------------------------

def smooth_inputs(shape: tuple[int, ...], seed: int = 0, cells: int = 6) -> torch.Tensor:
    """Random low-frequency images: noise on a coarse grid, bicubically enlarged."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(shape[0], shape[1], cells, cells, generator=g)
    return F.interpolate(coarse, size=shape[2:], mode="bicubic", align_corners=True)


def check(model: nn.Module, low: Rescaled, example_inputs: tuple, seed: int = 0) -> dict[str, Any]:
    """Fill each rescaled conv record's `error` (conv(↓x, ↓k) against ↓conv(x, k), smooth x, relative
    L2), and return the model-level errors on smooth inputs: the rescaled model on ↓x against the
    original on x (logits), and ↑(↓(model)) against the model."""
    from .validate import Recorder

    gm = _trace(model, example_inputs)
    x = smooth_inputs(tuple(example_inputs[0].shape), seed)
    convs = [r for r in low.records if r.status == "rescaled" and r.kind == "conv"]
    input_of = {n.target: n.args[0] for n in gm.graph.nodes if n.op == "call_module"}
    with torch.no_grad():
        recorder = Recorder(gm, {input_of[r.name] for r in convs})
        recorder.run(x)
        for rec in convs:
            xin = recorder.values[input_of[rec.name]]
            ref = downsample_input(gm.get_submodule(rec.name)(xin), low.factor)
            out = low.model.get_submodule(rec.name)(downsample_input(xin, low.factor))
            rec.error = _rel(out, ref)
        original = model(x)
        round_trip = up(low, like=model).eval()(x)
        at_low = low.model.eval()(downsample_input(x, low.factor))
    # a feature-map output is compared with ↓ of the original's
    original_low = downsample_input(original, low.factor) if at_low.shape != original.shape and original.dim() == 4 \
        else original
    return {"round_trip_rel_l2": _rel(round_trip, original), "low_resolution_rel_l2": _rel(at_low, original_low)}


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative L2 error; on feature maps whose borders differ by a row (sizes that do not divide),
    over the common part."""
    if out.dim() == 4 and out.shape != ref.shape:
        h, w = min(out.shape[2], ref.shape[2]), min(out.shape[3], ref.shape[3])
        out, ref = out[..., :h, :w], ref[..., :h, :w]
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


# --- the training schedule ----------------------------------------------------------------------

@dataclass
class Phase:
    name: str  # low | full
    epochs: int
    seconds: float


def recalibrate(model: nn.Module, batches: Iterable[torch.Tensor]) -> nn.Module:
    """Re-estimate every batch-norm layer's running statistics on `batches` (full-resolution
    inputs), in place. A model carried up from low resolution keeps the statistics its feature
    maps had at low resolution, which no longer hold: finer maps carry detail (and noise) that
    ↓ averaged away. `torch.optim.swa_utils.update_bn` does the work: a forward pass per batch
    in train mode without gradients, the statistics a plain mean over all of them.

    This is for a carried-up model that is evaluated or used as it is. Further training in
    train mode neither reads the running statistics (it normalises with each batch's own) nor
    keeps them (momentum 0.1 replaces them within a few dozen steps): a schedule that trains on
    at full resolution ends with the same model with or without this step."""
    with torch.no_grad():
        torch.optim.swa_utils.update_bn(batches, model)  # a no-op without batch norm
    return model


def schedule(model: nn.Module, example_inputs: tuple, factor: float, low_epochs: int, full_epochs: int,
             train_epoch: Callable[[nn.Module, float, int], None], rules: str | rules_mod.RescaleRules = "rescale",
             bn_batches: Iterable[torch.Tensor] | None = None) -> tuple[nn.Module, list[Phase], Rescaled]:
    """Rewrite down, train `low_epochs` at 1/factor resolution, rewrite up, train `full_epochs` at
    full resolution. `train_epoch(model, scale, epoch)` trains one epoch with inputs downsampled
    by `scale` (1.0 at full resolution; use `downsample_input`). With `bn_batches` (full-resolution
    inputs), the carried-up model's batch-norm statistics are re-estimated on them first
    (`recalibrate`; its time counts in the full phase): worth it only when `train_epoch` keeps
    batch norm in eval mode or `full_epochs` is 0 (see `recalibrate`). Returns the trained
    full-resolution model and the time of each phase (rewrites included)."""
    phases = []
    start = time.perf_counter()
    low = down(model, example_inputs, factor, rules)
    for epoch in range(low_epochs):
        train_epoch(low.model, factor, epoch)
    full = up(low, like=model) if low_epochs else copy.deepcopy(model)
    phases.append(Phase("low", low_epochs, time.perf_counter() - start))
    start = time.perf_counter()
    if low_epochs and bn_batches is not None:
        recalibrate(full, bn_batches)
    for epoch in range(full_epochs):
        train_epoch(full, 1.0, low_epochs + epoch)
    phases.append(Phase("full", full_epochs, time.perf_counter() - start))
    return full, phases, low


# --- the command: `fxopt rescale MODEL.py --factor 2 --out DIR` ----------------------------------

def save(model: nn.Module, low: Rescaled, example_inputs: tuple, out: str | Path, source: str) -> dict[str, Any]:
    """Check `low` against `model` (`check`) and write it as an fxopt result folder: model.pt2 (the
    low-resolution model, loadable with `fxopt.load`), report.json and report.md (the per-layer
    scaling check, the kept layers with their reasons, the input sizes it expects). Returns the report."""
    from .save import write_result
    from .trace import export_program

    checked = check(model, low, example_inputs)  # fills each rescaled conv's error first
    report = {"model": source, "technique": "rescale"} | low.report() | {"check": checked}
    small = [downsample_input(x, low.factor) for x in example_inputs]
    try:
        program = export_program(low.model.eval(), tuple(small))
    except Exception as exc:
        raise FxoptError(f"rescale: cannot export the rescaled model: {first_line(exc)}") from None
    write_result(out, program, report, {"report.md": markdown(report)}, input_shapes=low.input_shapes)
    return report


def markdown(report: dict[str, Any]) -> str:
    """The rescale report for people."""
    fmt = lambda v: "—" if v is None else f"{v:.3g}" if isinstance(v, float) else str(v)  # noqa: E731
    shapes = ", ".join("×".join(map(str, s)) for s in report["input_shapes"])
    lines = [f"# fxopt rescale: {report['model']}", "",
             f"Factor {report['factor']:g}: the rescaled model expects inputs of {shapes}.", "",
             f"Model on smooth inputs: rescaled model against the original, relative L2 "
             f"{fmt(report['check']['low_resolution_rel_l2'])}; carried down and up again, "
             f"{fmt(report['check']['round_trip_rel_l2'])}.", "",
             "| layer | kind | status | before | after | scaling error | reason |", "|---|---|---|---|---|---|---|"]
    for layer in report["layers"]:
        lines.append(f"| {layer['name']} | {layer['kind']} | {layer['status']} | {_geometry_text(layer['before'])} "
                     f"| {_geometry_text(layer['after'])} | {fmt(layer['error'])} | {layer['reason'] or ''} |")
    lines += ["", "Scaling error: conv(↓x, ↓k) against ↓conv(x, k) on smooth inputs (relative L2)."]
    return "\n".join(lines) + "\n"


def _geometry_text(g: dict[str, Any]) -> str:
    if not g:
        return ""
    if "kernel" in g:
        return f"{'×'.join(map(str, g['kernel']))}, stride {g['stride']}, padding {g['padding']}"
    return f"{g['in_features']} inputs ({'×'.join(map(str, g['map']))} map)"
