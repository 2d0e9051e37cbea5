"""The Triton NF4 dequant kernel against the PyTorch reference, on CPU through TRITON_INTERPRET=1."""

import pytest
import torch

from lorafit.quant.nf4 import quantize_nf4


@pytest.mark.parametrize("shape", [(64, 64), (33, 77), (3, 5)])
def test_triton_matches_reference(shape, triton_device):
    from lorafit.ops.triton.nf4_dequant import dequantize_nf4_triton

    device = triton_device
    torch.manual_seed(0)
    t = quantize_nf4(torch.randn(shape) * 0.02).to(device)
    ref = t.dequantize()
    out = dequantize_nf4_triton(t)
    assert out.shape == ref.shape
    assert (out - ref).abs().max() <= 1e-6
