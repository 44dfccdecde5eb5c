"""Shared test helpers: example models, small model files written into tmp_path."""

from __future__ import annotations

import importlib.util
import os
import sys
import textwrap
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton kernels run in the interpreter; it must be on before any kernel is defined
# (before fxopt is imported). With a GPU the kernels compile for real.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"


def _kernels_can_run() -> bool:
    from fxopt.codegen import registry

    return registry.HAVE_TRITON and (GPU or registry.interpreted())


# Triton kernel tests: real kernels on a GPU, the interpreter on CPU tensors elsewhere.
needs_triton = pytest.mark.skipif(not _kernels_can_run(), reason="Triton kernels need a GPU or TRITON_INTERPRET=1")
GPU_MARKS = [pytest.mark.gpu, pytest.mark.skipif(not GPU, reason="needs a CUDA GPU")]


def gpu_only(test):
    """A test that runs only where a CUDA GPU is (marked `gpu`)."""
    for mark in GPU_MARKS:
        test = mark(test)
    return test

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def write(tmp_path):
    """write("name.py", source) → path of a dedented file in tmp_path."""

    def _write(name: str, text: str) -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text).lstrip(), encoding="utf-8")
        return path

    return _write
