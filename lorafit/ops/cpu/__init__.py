"""CPU C kernels, compiled on first use with the system C compiler (`build`) and called via ctypes.

`nf4` wraps `nf4.c` (NF4 quantize/dequantize); `lorafit.quant.nf4` uses it for CPU tensors and falls
back to its pure-PyTorch reference when no compiler is available, compiling fails, or
LORAFIT_NO_CKERNEL=1.
"""
