"""CPU C kernels, compiled on first use with the system C compiler (`build`) and called via ctypes.

`nf4` wraps `nf4.c` (NF4 quantize/dequantize). `lorafit.quant.backend` picks it for CPU tensors and
falls back to the PyTorch reference when no compiler is available or compiling fails.
"""
