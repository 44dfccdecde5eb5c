"""Triton kernels per substitute (installed as `fxopt.codegen`).

* `registry.py`: the one decision point, `backend = auto | torch | triton` (`FXOPT_BACKEND`).
* `binary.py`: 1-bit packed-weight matmul, `fxopt::binary_linear` (GEMV and GEMM paths, fused
  scale/bias/activation epilogue), with its torch reference.

Each kernel file holds its kernel, its launcher and its `torch.library` registration; every other
substitute still runs its plain-torch reference. The Kronecker kernel and epilogue generation
from fx node chains arrive with the code-generation issue.
"""
