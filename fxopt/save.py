"""Saving and loading results.

An output directory holds

    model.pt2      the rewritten model as a torch.export program (weights included; no pickle)
    report.json    machine-readable report (stable keys)
    report.md      the same for people
    report.html    the graph diff, site table and plots (self-contained)
    manifest.json  marks the folder as an fxopt result

It is written into a temporary sibling folder and renamed into place only once complete; an
existing fxopt result is replaced only then, and a folder that is not an fxopt result is never
touched. `load` runs the model without the original model file and without unpickling code.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import types
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from fxopt.codegen.registry import call_directly

from .errors import OutputError, first_line

MANIFEST = "manifest.json"
FORMAT = "fxopt-result"


def _json_safe(value):
    """JSON has no NaN/Infinity: write them as null (the markdown report shows them)."""
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _umask() -> int:
    """The process umask (reading it means setting it, so set it back at once)."""
    umask = os.umask(0)
    os.umask(umask)
    return umask


@contextmanager
def atomic_directory(out: Path) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces `out`, on error it is removed."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise OutputError(f"{out}: directory is not empty and is not an fxopt result; refusing to overwrite it")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        tmp.chmod(0o777 & ~_umask())  # mkdtemp makes 0700; the result should look like any folder
    except OSError as exc:
        raise OutputError(f"{out}: cannot create output directory: {exc.strerror or exc}") from None
    try:
        yield tmp
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.rename(out, old)
        os.rename(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_text(path: str | Path, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same folder, then rename: a reader
    never sees half a file, and an error leaves any previous file as it was."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{path}: is a directory")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; the file should look like any other
        os.replace(tmp, path)
    except OSError as exc:
        raise OutputError(f"{path}: cannot write: {exc.strerror or exc}") from None


def write_json(path: str | Path, data) -> None:
    """`data` as JSON (NaN/Infinity as null), written as `write_text` does."""
    write_text(path, json.dumps(_json_safe(data), indent=2) + "\n")


def save(result, out_dir: str | Path) -> Path:
    """Write `result` (an fxopt.Result) into `out_dir` atomically; returns the folder."""
    from .html import report_page
    from .report import fixed_batch, markdown

    report = _json_safe(result.report)
    fixed = fixed_batch(report)
    return write_result(out_dir, result.program, report, {"report.md": markdown(result.report),
                                                          "report.html": report_page(report)},
                        **({"fixed_batch": fixed} if fixed is not None else {}))


def write_result(out_dir: str | Path, program: torch.export.ExportedProgram, report: dict,
                 pages: dict[str, str], **manifest_fields) -> Path:
    """An fxopt result folder, written atomically: model.pt2, report.json, the given `pages`
    (file name → text) and the manifest (with `manifest_fields`: what `fxopt rescale` records)."""
    from . import __version__

    out = Path(out_dir)
    with atomic_directory(out) as tmp:
        torch.export.save(program, tmp / "model.pt2")
        (tmp / "report.json").write_text(json.dumps(_json_safe(report), indent=2) + "\n", encoding="utf-8")
        for name, text in pages.items():
            (tmp / name).write_text(text, encoding="utf-8")
        manifest = {"format": FORMAT, "version": 1, "fxopt_version": __version__, "model": "model.pt2"}
        (tmp / MANIFEST).write_text(json.dumps(manifest | manifest_fields, indent=2) + "\n", encoding="utf-8")
    return out


def load(path: str | Path) -> nn.Module:
    """Load a saved result (its folder, or its model.pt2) as a runnable module."""
    path = Path(path)
    info: dict = {}
    if path.is_dir():
        manifest = path / MANIFEST
        if not manifest.is_file():
            raise OutputError(f"{path}: not an fxopt result (no {MANIFEST})")
        try:
            info = json.loads(manifest.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise OutputError(f"{manifest}: unreadable manifest: {exc}") from None
        if info.get("format") != FORMAT:
            raise OutputError(f"{manifest}: not an fxopt result manifest")
        path = path / info.get("model", "model.pt2")
    if not path.is_file():
        raise OutputError(f"{path}: no such file")
    try:
        program = torch.export.load(path)
    except Exception as exc:
        raise OutputError(f"{path}: cannot load exported program: {type(exc).__name__}: {exc}") from None
    fixed = info.get("fixed_batch")
    return FixedBatch(inference_module(program), fixed, path) if fixed is not None else inference_module(program)


def inference_module(program: torch.export.ExportedProgram) -> nn.Module:
    """`program.module()` that takes `eval()` (a no-op: the program was exported for inference), so
    that evaluation code written for the original model runs on it; `train()` says why it cannot.
    Its calls of fxopt's ops go through the functions the substitutes call (codegen.registry
    `call_directly`): the op's body in eager inference on CPU, without the op's dispatch (examples/mlp.py
    with `binary`: 0.79 → 0.68 ms a call on the 2-core VM); the op itself wherever it is traced."""
    module = program.module()
    call_directly(module)
    _check_inputs_in_forward(module)

    def train(self, mode: bool = True):
        if mode:
            raise NotImplementedError("an fxopt result is an inference program (exported in eval mode); "
                                      "train the original model, or the substitutes before export")
        return self

    module.train = types.MethodType(train, module)
    del module.eval  # nn.Module.eval calls train(False)
    return module


def _check_inputs_in_forward(module: nn.Module) -> None:
    """In place, where `module` is what torch.export's `module()` makes here: its three per-call hooks
    go, and `forward` compares the inputs' structure with the export's only when they are not
    simply the exported number of tensors.

    Those hooks are: the input check, which (the graph calling its own `_guards_fn`, which checks
    shapes and values) only flattens the inputs with their paths to compare their tree structure
    with the export's, and a pair that registers graph inputs of nn.Module type as pytree nodes
    (a program exported from tensors has none). Together ~40 µs a call on the 2-core VM, a tenth
    of examples/mlp.py's whole forward. A call with N tensors and no keywords has the structure
    of an export from N tensors, so for it the comparison is skipped and nothing else changes;
    any other call gets the export's own check and message. A module that does not look exactly
    like that (another torch version) is left as it is."""
    from torch.export import _unlift
    from torch.utils import _pytree as pytree

    pre, post = list(module._forward_pre_hooks.values()), list(module._forward_hooks)
    spec = getattr(module, "_in_spec", None)
    if not (hasattr(module, "_guards_fn") and spec is not None and len(pre) == 2 and len(post) == 1
            and pre[1] is _unlift._check_input_constraints_pre_hook):
        return
    count = spec.num_leaves
    if not _unlift.eq_spec(pytree.tree_structure((tuple(torch.empty(0) for _ in range(count)), {})), spec):
        return
    module._forward_pre_hooks.clear()
    module._forward_pre_hooks_with_kwargs.clear()
    module._forward_hooks.clear()
    module._forward_hooks_always_called.clear()

    def forward(*args, **kwargs):
        if module.validate_inputs and (kwargs or len(args) != count
                                       or not all(isinstance(a, torch.Tensor) for a in args)):
            _unlift._check_inputs_match(args, kwargs, spec)  # raises the export's message on a mismatch
        return type(module).forward(module, *args, **kwargs)  # the graph's code, also after a recompile

    module.forward = forward


class FixedBatch(nn.Module):
    """A loaded program whose batch dimension the model fixed: any other batch size gets an error
    that says so, instead of torch.export's guard message."""

    def __init__(self, program: nn.Module, size: int, path: Path):
        super().__init__()
        self.program, self.size, self.path = program, size, str(path)

    def forward(self, *args, **kwargs):
        first = next((a for a in args if isinstance(a, torch.Tensor) and a.dim()), None)
        if first is not None and first.shape[0] != self.size:
            raise ValueError(f"{self.path}: this model was saved with its batch size fixed at {self.size} (the model "
                             f"fixes it; see report.json export.batch); got a batch of {first.shape[0]}")
        return self.program(*args, **kwargs)


def load_report(path: str | Path) -> dict:
    """The report of a saved result folder, or a minimal one (graph only) for a bare `.pt2` file,
    so that `fxopt diff` compares either."""
    from .graphs import summarize

    path = Path(path)
    if path.is_dir():
        report_file = path / "report.json"
        if not report_file.is_file():
            raise OutputError(f"{path}: not an fxopt result (no report.json)")
        try:
            report = json.loads(report_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise OutputError(f"{report_file}: cannot read: {exc}") from None
        if not report.get("graphs"):
            raise OutputError(f"{report_file}: written by an fxopt without graphs in its report; re-run optimize")
        return report
    if path.suffix == ".pt2" and path.is_file():
        try:
            program = torch.export.load(path)
        except Exception as exc:
            raise OutputError(f"{path}: cannot load: {first_line(exc)}") from None
        g = summarize(program.graph_module)
        n = sum(p.numel() for p in program.graph_module.parameters())
        return {"model": str(path), "rules": "—", "sites": [], "graphs": {"original": g, "rewritten": g},
                "totals": {"sites": 0, "applied": 0, "rolled_back": 0, "gated": 0, "skipped": 0, "unused": 0},
                "end_to_end": {"params_before": n, "params_after": n, "flops_before": 0, "flops_after": 0}}
    raise OutputError(f"{path}: neither an fxopt result folder nor a .pt2 file")
