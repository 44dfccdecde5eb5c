"""Registry of substitutes: the names a rule's `substitute:` may use.

Each technique lives in its own file and registers one `SubstituteSpec`: its name, the ops it can
replace, its parameters (with defaults, documentation and a parser), and `build`, which calls the
technique's `from_original`. Rules name substitutes; this registry resolves the names
(DESIGN principle 1). A guard that does not fit a layer raises `Decline` with a reason that the
report shows; it never raises anything else for a layer it cannot handle (principle 3).

    >>> spec = get("kron")
    >>> params = spec.parse_params({"rank": 2})
    >>> sub = spec.build(torch.nn.Linear(64, 32), params)      # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

from torch import nn

OPS = ("linear", "conv1d", "conv2d")


class Decline(Exception):
    """A substitute's guard does not fit this layer; `str(exc)` is the reason for the report."""


@dataclass(frozen=True)
class Param:
    """One parameter of a substitute, as a rule's `params:` mapping gives it."""

    name: str
    doc: str
    default: Any
    parse: Callable[[Any], Any]  # YAML value → Python value; raises ValueError with a message


@dataclass(frozen=True)
class SubstituteSpec:
    name: str
    summary: str
    ops: tuple[str, ...]
    params: tuple[Param, ...]
    build: Callable[[nn.Module, Mapping[str, Any]], nn.Module]
    # Cross-parameter check on the explicitly given params; raises ValueError.
    check: Callable[[Mapping[str, Any]], None] = lambda given: None

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


# Parsers shared by techniques. Each takes the YAML value and returns the Python value.
def positive_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"expected a positive integer, got {value!r}")
    return value


def non_negative_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"expected an integer ≥ 0, got {value!r}")
    return value


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


def float_above(low: float) -> Callable[[Any], float]:
    def parse(value: Any) -> float:
        if isinstance(value, str):  # PyYAML reads 1e-3 as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > low:
            raise ValueError(f"expected a number greater than {low:g}, got {value!r}")
        return float(value)

    return parse


def deployable(module: nn.Module) -> nn.Module:
    """The form of a substitute that is saved and run: `module.deployable()` where a technique has
    a separate inference form (binary: packed bits), else the module itself."""
    return module.deployable() if hasattr(module, "deployable") else module


def constrain_(modules) -> None:
    """After an optimizer step: let every submodule that keeps a constraint restore it (binary
    clips its latent weights to [−1, 1])."""
    for m in modules:
        for sub in m.modules():
            if hasattr(sub, "constrain_"):
                sub.constrain_()


def conv_guard(conv: nn.Module, technique: str) -> None:
    """Decline convolutions the conv substitutes do not rebuild: grouped, or not zero-padded."""
    if getattr(conv, "groups", 1) != 1:
        raise Decline(f"grouped convolution (groups={conv.groups}) is not rewritten by {technique}")
    if getattr(conv, "padding_mode", "zeros") != "zeros":
        raise Decline(f"padding_mode={conv.padding_mode!r} is not supported by {technique}")


def conv_class(kernel_dims: int) -> type[nn.Module]:
    """nn.Conv1d or nn.Conv2d for a kernel with that many spatial dimensions."""
    return {1: nn.Conv1d, 2: nn.Conv2d}[kernel_dims]


# Each technique registers itself on import.
from . import kron  # noqa: E402,F401
from . import lowrank  # noqa: E402,F401
from . import separable  # noqa: E402,F401
from . import bottleneck  # noqa: E402,F401
from . import binary  # noqa: E402,F401
from . import rescale  # noqa: E402,F401
from . import wta_hash  # noqa: E402,F401
