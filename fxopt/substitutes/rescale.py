"""The `rescale` rule's parameters (kernel rescaling, fxopt/rescale.py).

Rescaling rewrites the whole model for another input resolution, so it is not a per-layer
substitute: its rules (rules/rescale.yaml) select the convolutions that `fxopt.rescale.down`
resizes, with the same match language. Under `fxopt optimize` each claimed layer declines, with
the reason saying where the technique lives.
"""

from __future__ import annotations

from typing import Any, Mapping

from torch import nn

from . import Decline, Param, SubstituteSpec, positive_int, register


def _build(module: nn.Module, params: Mapping[str, Any]) -> nn.Module:
    raise Decline("rescale rewrites the whole model for smaller inputs; use fxopt.rescale.down / "
                  "fxopt.rescale.schedule (README: rescale)")


SPEC = register(SubstituteSpec(
    name="rescale",
    summary="kernels resampled for a lower input resolution, then back (Porto Buarque de Gusmão et al. 2016); "
            "whole-model: fxopt.rescale",
    ops=("conv2d",),
    params=(Param("min_kernel", "kernels with fewer taps than this along an axis keep their size along it",
                  5, positive_int),),
    build=_build,
))
