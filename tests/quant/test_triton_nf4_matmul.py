"""The fused Triton NF4 dequant-matmul against dequantize + F.linear, on CPU through TRITON_INTERPRET=1.

Tolerance (max |kernel - reference| / max |reference|): fp32 1e-5 (fp32 accumulation in a different
order); bf16 1.2e-2, against the exact product of the bf16 inputs and bf16-rounded weight: the kernel
rounds W to bf16 and the fp32 accumulator to bf16 once (2^-8 relative each); under the interpreter
the measured error is 8e-3 (its fp32 -> bf16 casts appear to truncate rather than round).
"""

import pytest
import torch

from lorafit.quant.nf4 import quantize_nf4


@pytest.mark.parametrize("m,n,k,double,dtype,tol", [
    (1, 48, 128, True, torch.float32, 1e-5),
    (5, 70, 96, True, torch.float32, 1e-5),  # N not a multiple of the tile
    (3, 33, 77, True, torch.float32, 1e-5),  # odd K: bytes straddle rows, partial last block
    (4, 64, 64, False, torch.float32, 1e-5),  # plain fp32 statistics
    (2, 64, 128, True, torch.bfloat16, 1.2e-2),
])
def test_matches_reference(m, n, k, double, dtype, tol, triton_device):
    from lorafit.quant.reference import nf4_levels
    from lorafit.quant.triton.nf4_matmul import nf4_matmul_triton

    torch.manual_seed(0)
    t = quantize_nf4(torch.randn(n, k) * 0.05, double_quant=double).to(triton_device)
    x = torch.randn(m, k, device=triton_device).to(dtype)
    W = t.dequantize(dtype, backend="torch")
    ref = x @ W.t() if dtype == torch.float32 else x.float() @ W.float().t()
    stats = {k: (float(v) if k == "offset" else v) for k, v in t.stats().items()}
    out = nf4_matmul_triton(x, t.packed, tuple(t.shape), t.blocksize, nf4_levels(x.device), **stats)
    assert out.shape == ref.shape and out.dtype == dtype
    err = (out.float() - ref.float()).abs().max().item() / ref.float().abs().max().item()
    assert err <= tol, err
