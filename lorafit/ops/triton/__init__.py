"""Triton kernels. Nothing here imports triton until a kernel is called."""
