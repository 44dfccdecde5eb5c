"""Model file / nn.Module + example inputs → GraphModule with shapes and dtypes in node.meta.

`torch.fx.symbolic_trace` is tried first: it keeps module calls as `call_module` nodes, so rules
see layer types and names directly. Models it cannot capture (control flow on tensor values or
shapes, `.item()`, unsupported Python) fall back to `torch.export` (non-strict), whose graph has
`aten.linear` / `aten.conv2d` calls on `get_attr` parameters; matching handles both. Tracing
works on a deep copy because tracing can leave state behind in a model.

The model is first run eagerly on its example inputs, so a model that fails on them is reported as
such. Shapes come from running the graph once on the example inputs, so every node has
`node.meta["tensor_meta"]` whichever tracer produced it.
"""

from __future__ import annotations

import copy
import importlib.util
import io
import logging
import sys
import traceback
import warnings
from contextlib import contextmanager, redirect_stderr
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Iterable

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import _extract_tensor_metadata

from .attention import Region, Unexpanded, expand, expandable, inference_encoders
from .errors import ModelFileError, TraceFailure, first_line


@dataclass
class ModelSpec:
    """What a MODEL.py provides."""

    path: Path
    model: nn.Module
    example_inputs: tuple
    calibration_data: Callable[[], Iterable[Any]] | None
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None  # the user's metric (fxopt/budget.py)


@dataclass
class Traced:
    gm: fx.GraphModule
    method: str  # "symbolic_trace" | "export"
    fallback_reason: str | None  # why symbolic_trace was not used
    regions: list[Region] = field(default_factory=list)  # attention module calls opened up
    unexpanded: list[Unexpanded] = field(default_factory=list)  # attention module calls left opaque


def import_model_file(path: str | Path) -> ModuleType:
    """Import MODEL.py as a module (errors name the file and line)."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: no such model file")
    name = f"fxopt_user_model_{abs(hash(path.resolve()))}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ModelFileError(f"{path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look modules up here
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        raise ModelFileError(f"{path}: import failed: {_where(exc, path)}{type(exc).__name__}: {exc}") from None
    return module


def load_model_file(path: str | Path) -> ModelSpec:
    """Import MODEL.py and collect `model`/`build_model()`, `example_inputs()`, `calibration_data()`
    and `evaluate(model)`."""
    path = Path(path)
    module = import_model_file(path)
    if hasattr(module, "build_model"):
        model = _call(path, module.build_model, "build_model()")
    elif hasattr(module, "model"):
        model = module.model
    else:
        raise ModelFileError(f"{path}: defines neither `model` nor `build_model()`")
    if not isinstance(model, nn.Module):
        raise ModelFileError(f"{path}: the model is a {type(model).__name__}, not a torch.nn.Module")

    if not callable(getattr(module, "example_inputs", None)):
        raise ModelFileError(f"{path}: defines no `example_inputs()` function")
    inputs = _call(path, module.example_inputs, "example_inputs()")
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    if not isinstance(inputs, (tuple, list)) or not all(isinstance(t, torch.Tensor) for t in inputs):
        raise ModelFileError(f"{path}: example_inputs() must return a tuple of tensors, got {_describe(inputs)}")

    calib = getattr(module, "calibration_data", None)
    if calib is not None and not callable(calib):
        raise ModelFileError(f"{path}: `calibration_data` must be a function yielding input tuples")
    evaluate = getattr(module, "evaluate", None)
    if evaluate is not None and not callable(evaluate):
        raise ModelFileError(f"{path}: `evaluate` must be a function evaluate(model) -> dict of metrics")
    return ModelSpec(path, model, tuple(inputs), calib, evaluate)


def trace(model: nn.Module, example_inputs: tuple, source: str = "the model") -> Traced:
    """Capture `model` as a GraphModule with shapes in node.meta; TraceFailure names the construct."""
    model = copy.deepcopy(model).eval()
    try:
        with torch.no_grad():
            model(*example_inputs)
    except Exception as exc:
        raise TraceFailure(f"{source}: the model fails on its example inputs: {_where(exc)}{first_line(exc)}") from None
    with _quiet():  # torch logs graphs and warnings while it tries; our error says what matters
        try:
            gm = fx.symbolic_trace(model)
            values = _propagate_shapes(gm, example_inputs)
        except Exception as exc:  # any failure of the fast path sends us to torch.export
            first = f"{_where(exc)}{first_line(exc)}"
        else:
            regions, unexpanded = _expand_attention(gm, example_inputs, values)
            return Traced(gm, "symbolic_trace", None, regions, unexpanded)
        try:
            # a fresh copy: a failed symbolic_trace can leave state behind in the module
            with inference_encoders(copy.deepcopy(model)) as fresh:
                gm = export_program(fresh, example_inputs).module()
            _propagate_shapes(gm, example_inputs)
            return Traced(gm, "export", first)
        except Exception as exc:
            second = f"{_where(exc)}{first_line(exc)}"
    raise TraceFailure(f"cannot trace {source} ({type(model).__name__}): "
                       f"symbolic_trace: {first}; torch.export: {second}")


def export_program(module: nn.Module, example_inputs: tuple) -> torch.export.ExportedProgram:
    """Non-strict torch.export with the batch (first) dimension of every input left dynamic
    wherever the model allows it.

    torch.export specialises a dimension of size 1, so where an input's first dimension is 1 the
    program is exported on the inputs repeated twice along it, and kept when it runs the example
    inputs themselves and agrees with `module` on them; otherwise (a model that fixes its batch,
    e.g. `x.view(1, -1)`) it is exported on the example inputs as they are. `batch_size` says
    which one came out."""
    dynamic = tuple({0: torch.export.Dim.AUTO} if t.dim() else None for t in example_inputs)
    doubled = doubled_batch(example_inputs)
    if doubled is not None:
        try:
            with _quiet():
                program = torch.export.export(module, doubled, strict=False, dynamic_shapes=dynamic)
            if _agrees(module, program.module(), example_inputs):
                return program
        except Exception:  # the first dimension is not a free batch one: export as given below
            pass
    with _quiet():  # torch logs the specialisation the report states (export.batch)
        return torch.export.export(module, tuple(example_inputs), strict=False, dynamic_shapes=dynamic)


def doubled_batch(example_inputs: tuple) -> tuple | None:
    """The inputs with every first dimension of 1 repeated twice, or None when there is none."""
    if not any(t.dim() and t.shape[0] == 1 for t in example_inputs):
        return None
    return tuple(torch.cat([t, t]) if t.dim() and t.shape[0] == 1 else t for t in example_inputs)


@torch.no_grad()
def _agrees(module: nn.Module, exported: nn.Module, inputs: tuple) -> bool:
    from torch.utils._pytree import tree_leaves

    ref, out = tree_leaves(module(*inputs)), tree_leaves(exported(*inputs))
    if len(ref) != len(out):
        return False
    for r, o in zip(ref, out):
        if isinstance(r, torch.Tensor):
            if not isinstance(o, torch.Tensor) or r.shape != o.shape:
                return False
            if r.is_floating_point() and r.numel():
                scale = r.abs().max().item()
                if not torch.allclose(r, o, rtol=1e-4, atol=1e-5 * max(scale, 1e-30)):
                    return False
            elif not torch.equal(r, o):
                return False
    return True


def batch_size(program: torch.export.ExportedProgram) -> dict[str, Any]:
    """{"dynamic": True} when the program takes any batch size; {"dynamic": False, "size": n} when
    its first input's first dimension is fixed at n; {"dynamic": None} for inputs without one."""
    users = set(program.graph_signature.user_inputs)
    for node in program.graph.nodes:
        if node.op != "placeholder" or node.name not in users:
            continue
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor) and val.dim():
            size = val.shape[0]
            return {"dynamic": True} if isinstance(size, torch.SymInt) else {"dynamic": False, "size": int(size)}
    return {"dynamic": None}


@contextmanager
def _quiet():
    level = logging.root.manager.disable  # nested use leaves the outer level in place
    logging.disable(logging.CRITICAL)
    try:  # torch.export also print()s the partial graph to stderr when it fails
        with warnings.catch_warnings(), redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(level)


class _ShapeRecorder(fx.Interpreter):
    """Like torch.fx's ShapeProp (node.meta["tensor_meta"]), without printing on failure; keeps
    the values that the nodes in `keep` read."""

    def __init__(self, gm: fx.GraphModule, keep: set[fx.Node] = frozenset(), record: bool = True):
        super().__init__(gm)
        self.keep, self.record, self.values = keep, record, {}

    def run_node(self, n: fx.Node):
        value = super().run_node(n)
        if isinstance(value, torch.Tensor) and self.record:
            n.meta["tensor_meta"] = _extract_tensor_metadata(value)
        if n in self.keep:
            self.values[n] = value
        return value


def propagate_shapes(gm: fx.GraphModule, example_inputs: tuple) -> None:
    """Every tensor-valued node's shape and dtype into node.meta["tensor_meta"] (torch.fx's ShapeProp,
    silent when the graph fails: the caller says what failed)."""
    with torch.no_grad():
        _ShapeRecorder(gm).run(*example_inputs)


def _propagate_shapes(gm: fx.GraphModule, example_inputs: tuple, record: bool = True) -> dict[fx.Node, Any]:
    """Shapes into node.meta; returns the values read by attention-module calls (for `expand`)."""
    keep = {a for n in gm.graph.nodes if expandable(gm, n) for a in n.all_input_nodes}
    recorder = _ShapeRecorder(gm, keep, record)
    with torch.no_grad():
        recorder.run(*example_inputs)
    return recorder.values


def _expand_attention(gm: fx.GraphModule, example_inputs: tuple,
                      values: dict[fx.Node, Any]) -> tuple[list[Region], list[Unexpanded]]:
    """Open up attention-module calls (fxopt/attention.py) and propagate shapes again.

    Their graphs are exported on the calls' example values; a batch of 1 would make torch.export
    specialise the batch dimension, so where an input's first dimension is 1 the values come from
    a run on that input repeated twice, when the model accepts it."""
    if not values:
        return [], []
    doubled = doubled_batch(example_inputs)
    if doubled is not None:
        try:
            values = _propagate_shapes(gm, doubled, record=False)
        except Exception:  # the first dimension is not a batch one: keep the example's values
            pass
    regions, unexpanded = expand(gm, values)
    _propagate_shapes(gm, example_inputs)
    return regions, unexpanded


def _call(path: Path, fn: Callable, what: str) -> Any:
    try:
        return fn()
    except Exception as exc:
        raise ModelFileError(f"{path}: {what} failed: {_where(exc, path)}{type(exc).__name__}: {exc}") from None


def _where(exc: BaseException, prefer: Path | None = None) -> str:
    """'file:line (`code`): ' of the innermost frame outside torch/fxopt — the user's construct."""
    frames = traceback.extract_tb(exc.__traceback__)
    inside = ("/torch/", "/fxopt/", "/importlib/", "<frozen")
    user = [f for f in frames if not any(s in f.filename for s in inside)]
    if prefer is not None:
        user = [f for f in user if Path(f.filename).resolve() == prefer.resolve()] or user
    if not user:
        return ""
    f = user[-1]
    code = f" (`{f.line.strip()}`)" if f.line else ""
    return f"{Path(f.filename).name}:{f.lineno} in {f.name}{code}: "


def _describe(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of ({', '.join(type(v).__name__ for v in value)})"
    return f"a {type(value).__name__}"


def calibration_batches(spec: ModelSpec, limit: int | None = None) -> list[tuple]:
    """The model file's calibration batches as tuples of tensors (at most `limit`)."""
    if spec.calibration_data is None:
        return []
    batches = []
    try:
        for batch in spec.calibration_data():
            batch = (batch,) if isinstance(batch, torch.Tensor) else tuple(batch)
            if not all(isinstance(t, torch.Tensor) for t in batch):
                raise ModelFileError(f"{spec.path}: calibration_data() must yield tensors or tuples of tensors")
            batches.append(batch)
            if limit is not None and len(batches) >= limit:
                break
    except ModelFileError:
        raise
    except Exception as exc:
        raise ModelFileError(f"{spec.path}: calibration_data() failed: {_where(exc, spec.path)}"
                             f"{type(exc).__name__}: {exc}") from None
    return batches


def load_calibration_file(path: str | Path, batch_size: int, limit: int | None = None) -> list[tuple]:
    """Calibration batches from a `.pt` file (read with `weights_only=True`, so no code runs):
    one tensor (split along dim 0 into batches of `batch_size`), or a list of batches, each a
    tensor or a tuple/list of tensors."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: no such calibration file")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelFileError(f"{path}: cannot read calibration data ({first_line(exc)})") from None
    if isinstance(data, torch.Tensor):
        data = list(torch.split(data, max(batch_size, 1))) if data.dim() else None
    if not isinstance(data, (list, tuple)) or not data:
        raise ModelFileError(f"{path}: expected a tensor or a non-empty list of batches, got {type(data).__name__}")
    batches = []
    for i, batch in enumerate(data):
        batch = (batch,) if isinstance(batch, torch.Tensor) else batch
        if not isinstance(batch, (list, tuple)) or not batch or not all(isinstance(t, torch.Tensor) for t in batch):
            raise ModelFileError(f"{path}: batch {i} is not a tensor or a tuple of tensors")
        batches.append(tuple(batch))
    return batches[:limit] if limit is not None else batches


__all__ = ["ModelSpec", "Traced", "load_model_file", "trace", "export_program", "batch_size", "calibration_batches", "load_calibration_file"]
