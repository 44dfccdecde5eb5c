"""Triton kernels per substitute (installed as `fxopt.codegen`).

No kernel has landed yet: every substitute runs its plain-torch reference. Kernels, the
`auto | torch | triton` registry and epilogue generation arrive with the code-generation issue.
"""
