"""Triton RMSNorm and SwiGLU (forward and backward) against their PyTorch references, on CPU through
TRITON_INTERPRET=1. Tolerance, max |kernel - reference| / max |reference|: fp32 1e-5; bf16 2e-2
(the reference's autograd rounds its intermediates to bf16, the kernels keep them in fp32).
"""

import pytest
import torch

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def _check(got, ref, tol):
    for a, b in zip(got, ref):
        err = (a.float() - b.float()).abs().max().item() / b.float().abs().max().item()
        assert err <= tol, err


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_rmsnorm(dtype, offset, triton_device):
    from lorafit.ops.triton.rmsnorm import rmsnorm, rmsnorm_reference

    torch.manual_seed(0)
    x = torch.randn(3, 7, 80, device=triton_device).to(dtype).requires_grad_(True)  # H not a power of 2
    w = (torch.randn(80, device=triton_device) * 0.1 + 1).to(dtype).requires_grad_(True)
    g = torch.randn(3, 7, 80, device=triton_device).to(dtype)
    ref_x, ref_w = x.detach().float().requires_grad_(True), w.detach().float().requires_grad_(True)
    ref = rmsnorm_reference(ref_x, ref_w, 1e-6, offset)  # fp32 reference for gradients
    out = rmsnorm(x, w, 1e-6, offset)
    assert out.dtype == dtype and out.shape == x.shape
    _check([out], [rmsnorm_reference(x.detach(), w.detach(), 1e-6, offset)], TOL[dtype])
    _check(torch.autograd.grad(out, [x, w], g), torch.autograd.grad(ref, [ref_x, ref_w], g.float()), TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu(dtype, triton_device):
    from lorafit.ops.triton.swiglu import swiglu, swiglu_reference

    torch.manual_seed(0)
    a = torch.randn(2, 5, 300, device=triton_device).mul(3).to(dtype).requires_grad_(True)
    b = torch.randn(2, 5, 300, device=triton_device).to(dtype).requires_grad_(True)
    g = torch.randn(2, 5, 300, device=triton_device).to(dtype)
    ra, rb = a.detach().float().requires_grad_(True), b.detach().float().requires_grad_(True)
    ref = swiglu_reference(ra, rb)
    out = swiglu(a, b)
    assert out.dtype == dtype
    _check([out], [ref], TOL[dtype])
    _check(torch.autograd.grad(out, [a, b], g), torch.autograd.grad(ref, [ra, rb], g.float()), TOL[dtype])
