"""The one place that decides whether a kernel runs as Triton or as its torch reference.

    backend = auto | torch | triton

* `auto` (default): Triton for CUDA tensors when Triton is installed; on CPU tensors the op's CPU
  implementation where it has one (binary_linear: an int8 GEMM through oneDNN), else the torch
  reference (also where there is no Triton).
* `torch`: always the reference.
* `triton`: always Triton; on a machine without a GPU this needs `TRITON_INTERPRET=1` set before
  the kernels are imported (the tests do that), and runs the kernels on CPU tensors, slowly.

Set it with the environment variable `FXOPT_BACKEND` or, in Python, `use_backend("torch")` (a
context manager). Every kernel op and every substitute that calls one chooses with
`pick(tensor, triton_implementation, torch_implementation)`; `wants_triton` itself is asked only
where a whole strategy differs (wta_hash's CPU band tables).

An op may also name the function its substitute calls in its place (`direct_call`: the op, or in
eager inference on plain CPU tensors the op's body, without the custom-op dispatch);
`call_directly` points a loaded program's calls of the op at that function (fxopt.save.load).
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
from torch import fx
from torch.utils._python_dispatch import _get_current_dispatch_mode

BACKENDS = ("auto", "torch", "triton")

try:  # Triton is a Linux-only dependency; without it every kernel runs its torch reference
    import triton  # noqa: F401

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is absent
    HAVE_TRITON = False

_override: list[str] = []


def backend() -> str:
    """The backend in force: the innermost `use_backend`, else $FXOPT_BACKEND, else auto."""
    name = _override[-1] if _override else os.environ.get("FXOPT_BACKEND", "auto")
    if name not in BACKENDS:
        raise ValueError(f"FXOPT_BACKEND={name!r}: expected one of {', '.join(BACKENDS)}")
    return name


@contextmanager
def use_backend(name: str) -> Iterator[None]:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}: expected one of {', '.join(BACKENDS)}")
    _override.append(name)
    try:
        yield
    finally:
        _override.pop()


def interpreted() -> bool:
    """Triton kernels run in the interpreter (on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def wants_triton(x: torch.Tensor, name: str | None = None) -> bool:
    """Should a kernel taking `x` run its Triton implementation (under backend `name`, default the
    one in force)?"""
    name = name or backend()
    if name == "torch":
        return False
    if name == "triton":
        if not HAVE_TRITON:
            raise RuntimeError("FXOPT_BACKEND=triton but triton is not installed")
        if not x.is_cuda and not interpreted():
            raise RuntimeError("FXOPT_BACKEND=triton on a CPU tensor needs TRITON_INTERPRET=1")
        return True
    return HAVE_TRITON and x.is_cuda


def pick(x: torch.Tensor, triton_impl, torch_impl, cpu_impl=None):
    """The implementation to run on `x`: `triton_impl` where the backend wants Triton; `cpu_impl`
    (if given) for a CPU tensor under `auto`; else `torch_impl`."""
    name = backend()  # read once: these run on every kernel call
    if wants_triton(x, name):
        return triton_impl
    if cpu_impl is not None and name == "auto" and x.is_cpu:
        return cpu_impl
    return torch_impl


def eager_inference(tensors: list[torch.Tensor], weights: tuple[Optional[torch.Tensor], ...] = ()) -> bool:
    """Plain `tensors` (inputs), run eagerly, nothing recording them, and neither they nor the
    `weights` (a layer's parameters; None skipped) needing a gradient: where a kernel may skip the
    custom op's dispatch or write through `out=`. (A plain loop: it runs before every such call,
    where generators cost µs.)"""
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or _get_current_dispatch_mode() is not None:
        return False  # first: Dynamo cannot trace the functorch query below
    grad = torch.is_grad_enabled()
    for t in tensors:
        if (type(t) is not torch.Tensor or (grad and t.requires_grad)
                or torch._C._functorch.is_functorch_wrapped_tensor(t)):
            return False
    return not (grad and any(w is not None and w.requires_grad for w in weights))


def cache_root() -> Path:
    """Where fxopt caches what it generates or builds (epilogue sources, native kernels):
    $FXOPT_CACHE_DIR, else $XDG_CACHE_HOME/fxopt or ~/.cache/fxopt; the system's temporary folder
    where that cannot be made."""
    env = os.environ.get("FXOPT_CACHE_DIR")
    base = Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fxopt"
    try:
        base.mkdir(parents=True, exist_ok=True)
        return base
    except OSError:
        fallback = Path(tempfile.gettempdir()) / f"fxopt-{os.getuid() if hasattr(os, 'getuid') else 'user'}"
        fallback.mkdir(parents=True, exist_ok=True)
        return fallback


# op overload → the function that stands in for it (the op, or its body where nothing records or
# differentiates the call); filled by the kernel modules through `direct_call`
DIRECT: dict[object, Callable] = {}


def direct_call(op) -> Callable[[Callable], Callable]:
    """Decorator: `fn` (same arguments as `op`) is what a loaded program calls instead of `op`."""
    def register(fn: Callable) -> Callable:
        DIRECT[op] = fn
        return fn
    return register


def call_directly(gm: fx.GraphModule) -> int:
    """In place: `gm`'s calls of an op with a `direct_call` function call that function instead
    (an exported program names the op itself, whose dispatch costs tens of µs a call on CPU);
    returns how many calls were redirected."""
    nodes = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in DIRECT]
    for node in nodes:
        node.target = DIRECT[node.target]
    if nodes:
        gm.recompile()
    return len(nodes)
