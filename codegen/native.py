"""Native CPU kernels, built from their C source on first use and called through ctypes.

`bits_product()` is the packed 1-bit / ternary product (`bits_avx512.c`: table lookups, one
AVX-512 permute per 64 weights, in fp32). It exists only where the CPU has AVX-512 (as torch
detects it) and a C compiler with OpenMP is found ($CC, else gcc, cc, clang); elsewhere it is None
and codegen/binary_cpu.py compiles its loop with Inductor instead. $FXOPT_NATIVE=0 turns it off.

The shared object is built once per source and compiler into fxopt's cache (`registry.cache_root`),
written under a temporary name and renamed, so processes building it at once never load half a
file. See docs/architecture.md.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Callable, Optional

import torch

from .registry import cache_root

SOURCE = Path(__file__).with_name("bits_avx512.c")
FLAGS = ["-O3", "-mavx512f", "-fopenmp", "-shared", "-fPIC"]

log = logging.getLogger(__name__)


def _compiler() -> Optional[str]:
    return os.environ.get("CC") or next(filter(None, map(shutil.which, ("gcc", "cc", "clang"))), None)


def build(source: Path, flags: list[str]) -> Path:
    """The shared object of `source` built with `flags` (cached by content, compiler and flags).
    Raises OSError or subprocess.SubprocessError where it cannot be built."""
    cc = _compiler()
    if cc is None:
        raise OSError("no C compiler found ($CC, gcc, cc, clang)")
    key = hashlib.sha256(source.read_bytes() + " ".join([cc, *flags]).encode()).hexdigest()[:16]
    target = cache_root() / f"{source.stem}-{key}.so"
    if not target.exists():
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.stem}-", suffix=".so")
        os.close(fd)
        try:
            subprocess.run([cc, *flags, str(source), "-o", tmp], check=True, capture_output=True, timeout=300)
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return target


@functools.cache
def bits_product() -> Optional[Callable[..., int]]:
    """The C function `fxopt_bits_product(x, plus, minus, scale, bias, low, high, out, m, n, words,
    threads)` (raw pointers; minus NULL for binary, scale and bias NULL for the bare product, low and
    high the bounds of a clamp after them; returns 1 where a row's sum is not finite, -1 where it
    could not allocate; see bits_avx512.c), or None where it cannot run here."""
    if os.environ.get("FXOPT_NATIVE", "1") == "0" or torch.backends.cpu.get_cpu_capability() != "AVX512":
        return None
    try:
        fn = ctypes.CDLL(str(build(SOURCE, FLAGS))).fxopt_bits_product
    except (OSError, subprocess.SubprocessError, AttributeError) as e:
        detail = getattr(e, "stderr", b"") or b""
        log.warning("fxopt: the AVX-512 bits kernel could not be built (%s%s); using Inductor's loop", e,
                    f": {detail.decode(errors='replace').strip()[:300]}" if detail else "")
        return None
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    fn.argtypes = [pointer] * 5 + [ctypes.c_float] * 2 + [pointer] + [size] * 3 + [ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn
