"""Triton kernels for fastcl, installed as ``fastcl.triton_kernels``."""
