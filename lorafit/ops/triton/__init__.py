"""Triton kernels for training on CUDA (RMSNorm, SwiGLU). Nothing here imports triton until a kernel
is called; each has a PyTorch reference beside it and is tested under TRITON_INTERPRET=1."""
