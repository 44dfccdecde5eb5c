"""Triton kernels per substitute (installed as `fxopt.codegen`).

* `registry.py`: the one decision point, `backend = auto | torch | triton` (`FXOPT_BACKEND`).
* `binary.py`: 1-bit packed-weight matmul, `fxopt::binary_linear` (GEMV and GEMM paths, fused
  scale/bias/activation epilogue), with its torch reference.
* `kron.py`: Kronecker-sum matmul, `fxopt::kron_linear`: both GEMMs in one kernel, the
  intermediate on chip, bias and a generated epilogue before the store.
* `wta_hash.py`: WTA codes, candidate selection and the gathered matmul of `wta_hash`.
* `epilogue.py`: Triton source generated from a chain of pointwise steps (what the `fuse` pass
  reads off the fx nodes after a substitute), cached on disk, passed to kernels as a constexpr hook.
* `binary_cpu.py`: the 1-bit op's CPU routes; `native.py` builds and loads its AVX-512 C kernel
  (`bits_avx512.c`).

Each kernel file holds its kernel, its launcher and its `torch.library` registration; the other
substitutes run their plain-torch reference.
"""
