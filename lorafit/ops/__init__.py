"""The one seam for fast paths: `reference` is pure PyTorch and the source of truth; kernels
(`lorafit.ops.triton`) are imported lazily and tested against it."""
