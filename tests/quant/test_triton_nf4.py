"""The Triton NF4 kernels through the backend dispatch, forward and backward, against the PyTorch
reference; on the GPU when there is one, else on the CPU under TRITON_INTERPRET=1 (`triton_device`).

Dequantization must give the reference's bytes exactly (same arithmetic, no multiply-add fusion). One
exception, of the interpreter and not the kernel: it truncates fp32 -> bf16 where a GPU rounds to
nearest even, so on the CPU the bf16 output is compared with the truncated fp32 reference;
an NF4 linear layer's output and input gradient through the "triton" backend must equal the "torch"
backend's to fp32 rounding (the fused small-M matmul accumulates in another order).
"""

import pytest
import torch

from lorafit.quant import backend
from lorafit.quant.linear import NF4Linear
from lorafit.quant.nf4 import quantize_nf4


@pytest.fixture
def pinned_triton(triton_device):
    previous = backend.set_backend("triton")
    yield triton_device
    backend.set_backend(previous)


@pytest.mark.parametrize("layout", ["elements", "bytes"])
@pytest.mark.parametrize("double", [True, False])
@pytest.mark.parametrize("shape", [(64, 64), (33, 77), (3, 5), (1, 4097)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dequantize_is_bit_identical(shape, double, dtype, layout, pinned_triton, monkeypatch):
    from lorafit.quant.triton import nf4_dequant

    monkeypatch.setattr(nf4_dequant, "LAYOUT", layout)
    torch.manual_seed(0)
    t = quantize_nf4(torch.randn(shape) * 0.02, double_quant=double).to(pinned_triton)
    assert backend.choose(t.packed.device, "dequantize") == "triton"
    out = t.dequantize(dtype)
    ref = t.dequantize(dtype, backend="torch")
    if dtype == torch.bfloat16 and pinned_triton == "cpu":
        ref32 = t.dequantize(torch.float32, backend="torch")
        ref = (ref32.view(torch.int32) & -65536).view(torch.float32).to(torch.bfloat16)  # exact: low bits zero
    assert out.shape == ref.shape and out.dtype == dtype
    assert torch.equal(out, ref)


@pytest.mark.parametrize("tokens", [1, 5, 40])  # the fused matmul (<= SMALL_M tokens), then dequant + matmul
def test_nf4_linear_forward_and_backward(tokens, pinned_triton):
    torch.manual_seed(1)
    linear = torch.nn.Linear(96, 40, bias=True)
    layer = NF4Linear.from_linear(linear).to(pinned_triton)
    x = torch.randn(tokens, 96, device=pinned_triton, requires_grad=True)
    g = torch.randn(tokens, 40, device=pinned_triton)
    y = layer(x)
    (gx,) = torch.autograd.grad(y, [x], g)
    backend.set_backend("torch")
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = layer(x_ref)
    (gx_ref,) = torch.autograd.grad(y_ref, [x_ref], g)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-5, atol=1e-5)


def test_pinned_backend_that_cannot_run_is_an_error(monkeypatch):
    from lorafit.errors import LorafitError

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    t = quantize_nf4(torch.randn(8, 8))
    with pytest.raises(LorafitError, match="cannot run on cpu"):
        t.dequantize(backend="triton")
    with pytest.raises(LorafitError, match="unknown NF4 backend"):
        t.dequantize(backend="cuda")
