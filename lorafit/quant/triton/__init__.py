"""Triton kernels for NF4 on CUDA: dequantization, and a fused dequantize-matmul for few tokens.

Nothing here imports triton until a kernel is called; `lorafit.quant.backend` decides when they run.
"""
