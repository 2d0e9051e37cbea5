"""The Triton NF4 dequant kernel against the PyTorch reference, on CPU through TRITON_INTERPRET=1."""

import os

import pytest
import torch

from lorafit.quant.nf4 import quantize_nf4


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.mark.parametrize("shape", [(64, 64), (33, 77), (3, 5)])
def test_triton_matches_reference(shape):
    pytest.importorskip("triton")
    from lorafit.ops.triton.nf4_dequant import dequantize_nf4_triton

    device = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
    torch.manual_seed(0)
    t = quantize_nf4(torch.randn(shape) * 0.02).to(device)
    ref = t.dequantize()
    out = dequantize_nf4_triton(t)
    assert out.shape == ref.shape
    assert (out - ref).abs().max() <= 1e-6
