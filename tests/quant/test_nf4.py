import pytest
import torch

from lorafit.errors import LorafitError
from lorafit.quant.nf4 import (
    NF4_LEVELS,
    dequantize_blockwise_8bit,
    dynamic_map,
    quantize_blockwise_8bit,
    quantize_nf4,
)


def test_round_trip_error_bounded():
    torch.manual_seed(0)
    w = torch.randn(96, 200)
    t = quantize_nf4(w)
    d = t.dequantize()
    assert d.shape == w.shape and d.dtype == torch.float32
    # worst case: half the widest level gap times the block absmax, plus the 8-bit absmax error
    assert ((d - w).abs() / w.abs().max()).max() < 0.2
    assert t.packed.numel() == w.numel() // 2 and t.packed.dtype == torch.uint8


def test_levels_are_exact_fixed_points():
    w = torch.tensor(NF4_LEVELS * 4)  # one block of 64 containing every level
    t = quantize_nf4(w, double_quant=False)
    assert torch.equal(t.dequantize(), w)


def test_without_double_quant_absmax_is_fp32():
    t = quantize_nf4(torch.randn(10, 64), double_quant=False)
    assert t.absmax.dtype == torch.float32 and t.state2 is None and not t.double_quant


def test_blockwise_8bit_round_trip():
    x = torch.randn(1000)
    q, am = quantize_blockwise_8bit(x)
    back = dequantize_blockwise_8bit(q, am, dynamic_map())
    assert (back - x).abs().max() < 0.05 * x.abs().max()


def test_dtype_preserved_and_bf16_output():
    t = quantize_nf4(torch.randn(8, 64, dtype=torch.bfloat16))
    assert t.dtype == torch.bfloat16 and t.dequantize(torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize("bad", [dict(blocksize=48), dict(weight=torch.zeros(0)), dict(weight=torch.ones(4, dtype=torch.int32))])
def test_bad_input_raises(bad):
    kwargs = dict(weight=torch.randn(4, 64), blocksize=64) | bad
    with pytest.raises(LorafitError):
        quantize_nf4(kwargs.pop("weight"), **kwargs)
