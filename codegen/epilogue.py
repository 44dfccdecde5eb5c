"""Epilogues generated from fx node chains: the pointwise work after a matmul, run inside its kernel.

An epilogue is a chain of steps applied to the matmul's output `y`, in order:

    steps = (("relu",), ("mul", 0.5), ("add", 0))       # relu(y) * 0.5 + extras[0]

* unary steps: relu, gelu (exact erf form), silu, sigmoid, tanh;
* binary steps: add, sub, mul, div with a scalar (a float baked into the code) or an extra tensor
  (an int: its position in `extras`); rsub and rdiv put the operand on the left (`t - y`, `t / y`);
* clamp with (min, max), either may be None.

Extra tensors broadcast to the output (a bias vector, a residual of the output's shape); the kernel
reads each through its strides in the (rows, columns) view of the output, 0 where it broadcasts.
At most `MAX_EXTRAS` of them.

Three things come from one chain, so they cannot drift apart:

* `apply(y, steps, extras)`: the torch reference (the oracle, and what runs on CPU);
* `source(steps)`: the Triton source of `epilogue(acc, rows, cols, mask, e0, r0, c0, …)`, the
  constexpr hook a kernel template calls on its fp32 accumulator tile;
* `kernel_function(steps)`: that source written to a disk cache keyed by its hash
  (`registry.cache_root()`/epilogues), imported, and returned as a JITFunction.
  With FXOPT_DEBUG=1 the source is printed (to stderr) the first time it is loaded.

The chain travels through `torch.library` ops as JSON text (`encode` / `decode`): a custom op takes
strings, not nested tuples.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import math
import operator
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .registry import cache_root

MAX_EXTRAS = 4
aten = torch.ops.aten


@dataclass(frozen=True)
class Pointwise:
    """One step: its torch form, its Triton template, and how fx graphs spell it (what the fuse
    pass recognises: call_function targets, Tensor method names, module classes)."""

    torch: Callable
    triton: str  # {v}: the running value; {o}: the operand of a binary step
    functions: tuple = ()
    methods: tuple[str, ...] = ()
    modules: tuple[type, ...] = ()


# The one table of pointwise steps: generator, reference and fuse pass all read it.
UNARY = {
    "relu": Pointwise(F.relu, "tl.maximum({v}, 0.0)", (torch.relu, F.relu, aten.relu.default), ("relu",), (nn.ReLU,)),
    "gelu": Pointwise(F.gelu, "0.5 * {v} * (1.0 + tl.erf({v} * 0.7071067811865476))",  # exact (erf) form only
                      (F.gelu, aten.gelu.default), (), (nn.GELU,)),
    "silu": Pointwise(F.silu, "{v} * tl.sigmoid({v})", (F.silu, aten.silu.default), (), (nn.SiLU,)),
    "sigmoid": Pointwise(torch.sigmoid, "tl.sigmoid({v})", (torch.sigmoid, F.sigmoid, aten.sigmoid.default),
                         ("sigmoid",), (nn.Sigmoid,)),
    "tanh": Pointwise(torch.tanh, "2.0 * tl.sigmoid(2.0 * {v}) - 1.0", (torch.tanh, F.tanh, aten.tanh.default),
                      ("tanh",), (nn.Tanh,)),
}
BINARY = {
    "add": Pointwise(lambda v, o: v + o, "{v} + {o}", (operator.add, torch.add, aten.add.Tensor), ("add",)),
    "sub": Pointwise(lambda v, o: v - o, "{v} - {o}", (operator.sub, torch.sub, aten.sub.Tensor), ("sub",)),
    "mul": Pointwise(lambda v, o: v * o, "{v} * {o}", (operator.mul, torch.mul, aten.mul.Tensor), ("mul",)),
    "div": Pointwise(lambda v, o: v / o, "{v} / {o}", (operator.truediv, torch.div, aten.div.Tensor), ("div",)),
    "rsub": Pointwise(lambda v, o: o - v, "{o} - {v}"),  # the running value on the right (fuse: SWAPPED)
    "rdiv": Pointwise(lambda v, o: o / v, "{o} / {v}"),
}
SWAPPED = {"add": "add", "mul": "mul", "sub": "rsub", "div": "rdiv"}
CLAMPS = {  # spelling → which bounds it takes (the step is always ("clamp", lo, hi))
    "clamp": ((torch.clamp, aten.clamp.default), ("min", "max")),
    "clamp_min": ((torch.clamp_min, aten.clamp_min.default), ("min",)),
    "clamp_max": ((torch.clamp_max, aten.clamp_max.default), ("max",)),
}
Steps = tuple[tuple[Any, ...], ...]


def check(steps: Sequence[Sequence[Any]]) -> Steps:
    """The chain as a tuple of tuples, or ValueError naming the step at fault."""
    out = []
    for i, step in enumerate(steps):
        step = tuple(step)
        name, args = (step[0] if step else None), step[1:]
        if name in UNARY and not args:
            pass
        elif name in BINARY and len(args) == 1 and _operand_ok(args[0]):
            args = (args[0] if isinstance(args[0], int) and not isinstance(args[0], bool) else float(args[0]),)
        elif name == "clamp" and len(args) == 2 and all(a is None or _number(a) for a in args):
            args = tuple(None if a is None else float(a) for a in args)
        else:
            raise ValueError(f"epilogue step {i}: {list(step)!r} is not a step this generator knows")
        out.append((name, *args))
    return tuple(out)


def _number(a: Any) -> bool:
    return isinstance(a, float) and math.isfinite(a)


def _operand_ok(a: Any) -> bool:
    if isinstance(a, int) and not isinstance(a, bool):
        return 0 <= a < MAX_EXTRAS
    return _number(a)


def encode(steps: Sequence[Sequence[Any]]) -> str:
    """Canonical JSON text of a chain (the op argument, and the cache key's input)."""
    return json.dumps([list(s) for s in check(steps)], separators=(",", ":"))


@functools.lru_cache(maxsize=256)
def decode(text: str) -> Steps:
    """The chain from its JSON text; cached, since the op decodes its argument on every call."""
    return check(json.loads(text)) if text else ()


def leading_clamp(steps: Steps) -> tuple[float, float, Steps]:
    """(low, high, the steps after it) where the chain starts with a relu or a clamp (relu is a
    clamp to [0, inf); None bounds become ±inf), else (-inf, inf, steps): what a kernel that
    clamps its own output can take over."""
    if steps and steps[0] == ("relu",):
        return 0.0, math.inf, steps[1:]
    if steps and steps[0][0] == "clamp":
        low, high = steps[0][1:]
        return (-math.inf if low is None else low), (math.inf if high is None else high), steps[1:]
    return -math.inf, math.inf, steps


def extras_used(steps: Steps) -> int:
    return max((s[1] + 1 for s in steps if s[0] in BINARY and isinstance(s[1], int)), default=0)


def apply(y: torch.Tensor, steps: Steps, extras: Sequence[torch.Tensor] = ()) -> torch.Tensor:
    """The torch reference: the chain applied to `y` step by step."""
    for name, *args in steps:
        if name in UNARY:
            y = UNARY[name].torch(y)
        elif name in BINARY:
            o = extras[args[0]] if isinstance(args[0], int) else args[0]
            y = BINARY[name].torch(y, o)
        else:
            y = y.clamp(*args)
    return y


def source(steps: Steps) -> str:
    """Triton source of the epilogue hook for `steps`.

    The hook gets the fp32 accumulator tile, broadcastable row and column indices of the output,
    the tile's mask, and (pointer, row stride, column stride) for each of MAX_EXTRAS extras."""
    params = ", ".join(f"e{i}, r{i}, c{i}" for i in range(MAX_EXTRAS))
    lines = ["import triton", "import triton.language as tl", "", "", "@triton.jit",
             f"def epilogue(acc, rows, cols, mask, {params}):"]
    loaded = set()
    for i, (name, *args) in enumerate(steps):
        v = "acc"
        if name in UNARY:
            expr = UNARY[name].triton.format(v=v)
        elif name in BINARY:
            if isinstance(args[0], int):
                j = args[0]
                if j not in loaded:
                    lines.append(f"    t{j} = tl.load(e{j} + rows * r{j} + cols * c{j}, mask=mask, other=1.0)"
                                 ".to(tl.float32)")
                    loaded.add(j)
                operand = f"t{j}"
            else:
                operand = repr(args[0])
            expr = BINARY[name].triton.format(v=v, o=operand)
        else:
            lo, hi = args
            expr = v
            if lo is not None:
                expr = f"tl.maximum({expr}, {lo!r})"
            if hi is not None:
                expr = f"tl.minimum({expr}, {hi!r})"
        lines.append(f"    acc = {expr}  # step {i}: {name}")
    lines.append("    return acc")
    return "\n".join(lines) + "\n"


def cache_dir() -> Path:
    return cache_root() / "epilogues"


_loaded: dict[Steps, Any] = {}  # chain → its JITFunction, once per process (kernels launch per call)


def kernel_function(steps: Steps):
    """The JITFunction for `steps`, from the disk cache (written on first use, atomically)."""
    if steps in _loaded:
        return _loaded[steps]
    text = source(steps)
    key = hashlib.sha256(text.encode()).hexdigest()[:20]
    path = cache_dir() / f"epilogue_{key}.py"
    if not path.exists() or path.read_text(encoding="utf-8") != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    if os.environ.get("FXOPT_DEBUG") == "1":
        print(f"fxopt: epilogue {encode(steps)} → {path}\n{text}", file=sys.stderr)
    spec = importlib.util.spec_from_file_location(f"fxopt_epilogue_{key}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # Triton reads the function's source back from this file
    _loaded[steps] = module.epilogue
    return module.epilogue


def pointer_args(extras: Sequence[torch.Tensor], out_shape: Sequence[int], dummy: torch.Tensor) -> list:
    """(pointer, row stride, column stride) × MAX_EXTRAS for a kernel writing an output of
    `out_shape` seen as (rows, last dim): each extra is broadcast to that view (stride 0 where it
    broadcasts; a reshape that cannot be a view copies), unused slots get `dummy`."""
    out: list = []
    for t in extras:
        view = t.to(dummy.device).expand(*out_shape).reshape(-1, out_shape[-1])
        out += [view, view.stride(0), view.stride(1)]
    for _ in range(MAX_EXTRAS - len(extras)):
        out += [dummy, 0, 0]
    return out
