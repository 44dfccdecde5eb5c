"""The substitute contract and the registry of techniques (docs/architecture.md, "Substitutes").

Two things live here.

* `Substitute`, the base class of every module a technique builds. It declares each hook the
  pipeline, the passes and validation call, with its default, so nothing probes with `hasattr`:

      flops(in_shape, out_shape)   FLOPs for these shapes; None (default): the dense layer's count
      reconstruction_error         relative weight error at build time; None (default): not measured
      deployable()                 the form that is saved and run (default: the module itself)
      constrain_()                 restore a constraint after an optimizer step (default: none)
      epilogue_capacity(steps)     how many leading pointwise steps the fuse pass may fold into
      with_epilogue(steps)         the kernel (default 0), and the copy that runs them
      validated_by                 "error" (SQNR & co., default) or "recall" (computes some outputs)
      fits_inputs, fit_inputs(original, gram)
                                   a closed-form refit to the layer's inputs before layer-wise
                                   steps (default: none)

* `SubstituteSpec`, one per technique, registered by the technique's own file: its name, the ops it
  replaces, its parameters (documentation and parser; defaults read from the signature of the
  technique's `from_original`, so they are written once), `build`, and what the contract test
  needs (`exact`: parameters under which the substitute reproduces a given layer), and `relax`, the
  next less compressive parameters (the accuracy budget's ladder). Every module in
  this package is imported when the package is, so adding a technique is adding a file.

A guard that does not fit a layer raises `Decline` with a reason that the report shows; it never
raises anything else for a layer it cannot handle.

    >>> spec = get("kron")
    >>> params = spec.parse_params({"rank": 2})
    >>> sub = spec.build(torch.nn.Linear(64, 32), params)      # doctest: +SKIP
"""

from __future__ import annotations

import copy
import importlib
import inspect
import math
import pkgutil
from dataclasses import dataclass, replace
from typing import Any, Callable, ClassVar, Mapping

import torch
from torch import nn

from fxopt.codegen import epilogue as ep

OPS = ("linear", "conv1d", "conv2d")
VALIDATIONS = ("error", "recall")


class Decline(Exception):
    """A substitute's guard does not fit this layer; `str(exc)` is the reason for the report."""


class Substitute(nn.Module):
    """Base class of every substitute module; each hook below has its default (module docstring)."""

    validated_by: ClassVar[str] = "error"
    fits_inputs: ClassVar[bool] = False  # fit_inputs below does something (layer-wise training asks)
    reconstruction_error: float | None = None

    def flops(self, input_shape: torch.Size, output_shape: torch.Size) -> int | None:
        """FLOPs (2 × MACs of the matmuls and convolutions) for these shapes; None: the dense count."""
        return None

    def deployable(self) -> nn.Module:
        """The form that is saved and run (binary: packed bits)."""
        return self

    def constrain_(self) -> None:
        """Called after every optimizer step (binary clips its latent weights to [−1, 1])."""

    def fit_inputs(self, original: nn.Module, gram: torch.Tensor) -> None:
        """Refit in closed form to the inputs `original` sees (Gram matrix X·Xᵀ), where `fits_inputs`."""
        raise NotImplementedError(f"{type(self).__name__} has no closed-form fit to its inputs")

    def epilogue_capacity(self, steps: tuple) -> int:
        """How many leading pointwise `steps` (fxopt.codegen.epilogue) this module can run itself."""
        return 0

    def with_epilogue(self, steps: tuple) -> "Substitute":
        """A copy, sharing the parameters, that also applies `steps` to its output."""
        raise NotImplementedError(f"{type(self).__name__} runs no epilogue (epilogue_capacity is 0)")


class FusedEpilogue(Substitute):
    """A substitute whose kernel runs any pointwise chain after its matmul (fxopt.codegen.epilogue):
    `epilogue` is the chain (empty by default), `_epilogue_text` its JSON, the kernel op's argument
    (encoded once: Dynamo does not trace json). The fuse pass sets it through `with_epilogue`."""

    _epilogue: tuple = ()
    _epilogue_text: str = ""

    @property
    def epilogue(self) -> tuple:
        return self._epilogue

    @epilogue.setter
    def epilogue(self, steps) -> None:
        self._epilogue = ep.check(steps)
        self._epilogue_text = ep.encode(self._epilogue)

    def epilogue_capacity(self, steps: tuple) -> int:
        return len(steps)

    def with_epilogue(self, steps: tuple) -> "FusedEpilogue":
        fused = copy.copy(self)
        fused.epilogue = self.epilogue + tuple(steps)
        return fused


_UNSET = object()


@dataclass(frozen=True)
class Param:
    """One parameter of a substitute, as a rule's `params:` mapping gives it. Its default is the
    one in the signature of the spec's `defaults` function; `default` here is for a parameter that
    function lacks, or for a rule default that deliberately differs from the Python one (kron's
    FLOPs cap: rules never build a layer slower than dense, `from_original` builds what it is asked)."""

    name: str
    doc: str
    parse: Callable[[Any], Any]  # YAML value → Python value; raises ValueError with a message
    default: Any = _UNSET


@dataclass(frozen=True)
class SubstituteSpec:
    name: str
    summary: str
    ops: tuple[str, ...]
    params: tuple[Param, ...]
    build: Callable[[nn.Module, Mapping[str, Any]], Substitute]
    # The function whose keyword defaults are the parameters' defaults (the technique's from_original).
    defaults: Callable[..., Any] | None = None
    # Cross-parameter check on the explicitly given params; raises ValueError.
    check: Callable[[Mapping[str, Any]], None] = lambda given: None
    # Parameters under which `build` reproduces this layer exactly, for the contract test; None
    # where no setting that build accepts is exact.
    exact: Callable[[nn.Module], Mapping[str, Any]] | None = lambda layer: {}
    # Put a layer's weights where the technique is exact (a quantizer: on its grid); None: any layer.
    representable: Callable[[nn.Module], None] | None = None
    saves_flops: bool = True  # flops ≤ the dense count at the default parameters
    # Parameters one step less compressive (about twice the capacity), or None where there is no
    # such step; the accuracy budget climbs this ladder before it gives a site back (fxopt/budget.py).
    # None here: the technique has no ladder (its sites are applied or rolled back).
    relax: Callable[[Mapping[str, Any]], dict[str, Any] | None] | None = None

    def __post_init__(self) -> None:
        signature = inspect.signature(self.defaults) if self.defaults else None
        params = []
        for p in self.params:
            declared = signature.parameters.get(p.name) if signature else None
            has_signature = declared is not None and declared.default is not inspect.Parameter.empty
            if has_signature and p.default is not _UNSET and p.default == declared.default:
                raise ValueError(f"{self.name}.{p.name}: default {p.default!r} written twice "
                                 f"(Param and {self.defaults.__qualname__})")
            if not has_signature and p.default is _UNSET:
                raise ValueError(f"{self.name}.{p.name}: no default")
            params.append(replace(p, default=declared.default) if has_signature and p.default is _UNSET else p)
        object.__setattr__(self, "params", tuple(params))

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)

    def parse_params(self, raw: Mapping[str, Any]) -> dict[str, Any]:
        """Validate a rule's raw params and fill in defaults (no positions: rules.py adds them)."""
        given = {}
        for key, value in raw.items():
            spec = self.param(key)
            if spec is None:
                known = ", ".join(p.name for p in self.params)
                raise KeyError(f"unknown parameter {key!r} for substitute {self.name!r} (known: {known})")
            given[key] = spec.parse(value)
        self.check(given)
        return {p.name: given.get(p.name, p.default) for p in self.params} | given


_REGISTRY: dict[str, SubstituteSpec] = {}


def register(spec: SubstituteSpec) -> SubstituteSpec:
    if spec.name in _REGISTRY:
        raise ValueError(f"substitute {spec.name!r} registered twice")
    _REGISTRY[spec.name] = spec
    return spec


def get(name: str) -> SubstituteSpec:
    """The spec registered under `name`; KeyError names the known ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown substitute {name!r} (known: {', '.join(sorted(_REGISTRY))})") from None


def names() -> list[str]:
    return sorted(_REGISTRY)


# --- the parsers every technique shares: YAML value → Python value, or ValueError ---------------

def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def positive_int(value: Any) -> int:
    if not _integer(value) or value < 1:
        raise ValueError(f"expected a positive integer, got {value!r}")
    return value


def non_negative_int(value: Any) -> int:
    if not _integer(value) or value < 0:
        raise ValueError(f"expected an integer ≥ 0, got {value!r}")
    return value


def int_in(low: int, high: int | None = None) -> Callable[[Any], int]:
    """An integer with low ≤ value (≤ high)."""
    def parse(value: Any) -> int:
        if not _integer(value) or value < low or (high is not None and value > high):
            span = f"from {low} to {high}" if high is not None else f"≥ {low}"
            raise ValueError(f"expected an integer {span}, got {value!r}")
        return value

    return parse


def one_of(options: tuple[str, ...]) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        if value not in options:
            raise ValueError(f"expected one of {', '.join(options)}, got {value!r}")
        return value

    return parse


def boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {value!r}")
    return value


def optional(parse: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """`parse`, with YAML null (None) let through: "no such budget"."""
    return lambda value: None if value is None else parse(value)


def number_in(low: float = -math.inf, high: float = math.inf, *, low_open: bool = True,
              high_open: bool = True) -> Callable[[Any], float]:
    """A finite number in the interval (low, high), its ends closed where asked; accepts the text
    PyYAML leaves for 1e-3 (no dot: read as a string)."""
    def parse(value: Any) -> float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if ok:
            ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
        if not ok:
            if high == math.inf:
                raise ValueError(f"expected a number {'greater than' if low_open else 'at least'} {low:g}, got {value!r}")
            raise ValueError(f"expected a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
                             f", got {value!r}")
        return float(value)

    return parse


def float_above(low: float) -> Callable[[Any], float]:
    return number_in(low)


# --- helpers for the hooks and the guards -----------------------------------------------------

def deployable(module: nn.Module) -> nn.Module:
    """The form of a module that is saved and run (see `Substitute.deployable`)."""
    return module.deployable() if isinstance(module, Substitute) else module


def constrain_(modules) -> None:
    """After an optimizer step: every substitute inside `modules` restores its constraint."""
    for m in modules:
        for sub in m.modules():
            if isinstance(sub, Substitute):
                sub.constrain_()


def conv_guard(conv: nn.Module, technique: str) -> None:
    """Decline convolutions the conv substitutes do not rebuild: grouped, or not zero-padded."""
    if conv.groups != 1:
        raise Decline(f"grouped convolution (groups={conv.groups}) is not rewritten by {technique}")
    if conv.padding_mode != "zeros":
        raise Decline(f"padding_mode={conv.padding_mode!r} is not supported by {technique}")


def conv_class(kernel_dims: int) -> type[nn.Module]:
    """nn.Conv1d or nn.Conv2d for a kernel with that many spatial dimensions."""
    return {1: nn.Conv1d, 2: nn.Conv2d}[kernel_dims]


def doubled(params: Mapping[str, Any], *names: str) -> dict[str, Any]:
    """`params` with each named parameter that is set (not None) doubled: a `relax` step."""
    return dict(params) | {n: 2 * params[n] for n in names if params[n] is not None}


def _register_all() -> None:
    """Import every technique file of this package; each registers itself."""
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        importlib.import_module(f"{__name__}.{info.name}")


_register_all()
