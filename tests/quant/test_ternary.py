import pytest
import torch
from torch import nn

from lorafit.errors import LorafitError
from lorafit.quant.ternary import (
    TernaryLinear,
    convert_to_packed,
    pack_ternary,
    quantize_ternary,
    unpack_ternary,
)


@pytest.mark.parametrize("n", [1, 4, 13, 64])
def test_pack_round_trip_exact(n):
    q = torch.randint(-1, 2, (7, n))
    packed = pack_ternary(q)
    assert packed.dtype == torch.uint8 and packed.shape == (7, -(-n // 4))
    assert torch.equal(unpack_ternary(packed, n), q.to(torch.int8))


def test_pack_rejects_non_ternary():
    with pytest.raises(LorafitError):
        pack_ternary(torch.tensor([0, 2]))
    with pytest.raises(LorafitError):
        pack_ternary(torch.tensor([0.5]))


def test_quantize_ternary_absmean():
    w = torch.tensor([[0.9, -0.05, -1.1, 0.2]])
    q, s = quantize_ternary(w)
    assert torch.equal(q, torch.tensor([[1, 0, -1, 0]], dtype=torch.int8))
    assert torch.allclose(s, w.abs().mean(dim=1, keepdim=True) + 1e-5)
    with pytest.raises(LorafitError):
        quantize_ternary(torch.randn(2, 10), group_size=3)


def test_linear_storage_and_grad():
    lin = TernaryLinear.from_linear(nn.Linear(64, 32), group_size=16)
    assert lin.packed.numel() == 32 * 16 and lin.scale.shape == (32, 4)
    x = torch.randn(3, 64, requires_grad=True)
    lin(x).sum().backward()
    assert torch.allclose(x.grad, lin.dequantize().sum(0).expand(3, -1), atol=1e-6)


def test_convert_to_packed_logits_equal():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.Linear):
                m.weight.copy_(torch.randint(-1, 2, m.weight.shape) * torch.rand(m.out_features, 1))
    x = torch.randn(5, 16)
    ref = model(x)
    convert_to_packed(model, skip=())
    assert isinstance(model[0], TernaryLinear) and isinstance(model[2], TernaryLinear)
    assert torch.equal(model(x), ref)


def test_convert_to_packed_rejects_dense_unless_requantize():
    model = nn.Sequential(nn.Linear(8, 8))
    with pytest.raises(LorafitError, match="'0'"):
        convert_to_packed(model, skip=())
    convert_to_packed(model, skip=(), requantize=True)
    assert isinstance(model[0], TernaryLinear)


@pytest.mark.parametrize("group_size", [None, 16])
def test_storage_as_parameters_keeps_the_weight_rows_first(group_size):
    """What FSDP2 shards: the packed codes and scales as frozen Parameters, each row of the weight in
    one row of both; the same output; a dtype cast leaves them; a new weight is held as buffers again."""
    torch.manual_seed(0)
    layer = TernaryLinear.from_linear(nn.Linear(64, 10, bias=False), group_size=group_size)
    x = torch.randn(3, 64)
    expected, buffers = layer(x), {n: b.clone() for n, b in layer.named_buffers()}
    layer.storage_as_parameters()
    assert dict(layer.named_buffers()) == {} and set(layer.STORAGE) == {"packed", "scale"}
    assert all(not p.requires_grad for p in layer.parameters())
    assert layer.packed.shape == (10, 16) and layer.scale.shape == (10, 64 // (group_size or 64))
    assert all(torch.equal(getattr(layer, n), b) for n, b in buffers.items())
    layer = layer.to(torch.bfloat16)
    assert layer.packed.dtype == torch.uint8 and layer.scale.dtype == torch.float32
    assert torch.equal(layer(x), expected)
    layer.set_weight(torch.randn(10, 64))
    assert set(dict(layer.named_buffers())) == {"packed", "scale"} and layer.STORAGE == ()
