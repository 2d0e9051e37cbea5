import pytest
import torch
from torch import nn

from lorafit.errors import LorafitError
from lorafit.quant.linear import NF4Linear, weight_storage_bytes


def _layer():
    torch.manual_seed(0)
    return nn.Linear(130, 70)


def test_forward_backward_match_dense_dequantized():
    lin = _layer()
    q = NF4Linear.from_linear(lin)
    dense = nn.Linear(130, 70)
    dense.weight.data = q.dequantize(torch.float32)
    dense.bias.data = lin.bias.data.clone()
    x1 = torch.randn(3, 5, 130, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    y1, y2 = q(x1), dense(x2)
    assert (y1 - y2).abs().max() < 1e-6
    g = torch.randn_like(y1)
    y1.backward(g)
    y2.backward(g)
    assert (x1.grad - x2.grad).abs().max() < 1e-6
    assert all(not p.requires_grad for p in q.parameters())


def test_no_dense_weight_saved_for_backward():
    q = NF4Linear.from_linear(_layer())
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        q(torch.randn(2, 130, requires_grad=True)).sum()
    assert (70, 130) not in saved


def test_to_dtype_keeps_codes_and_computes_in_input_dtype():
    q = NF4Linear.from_linear(_layer())
    before = {k: v.clone() for k, v in q.state_dict().items() if k != "bias"}
    q = q.to(torch.bfloat16)
    for k, v in before.items():
        assert torch.equal(q.state_dict()[k], v), k
    assert q(torch.randn(2, 130, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_set_weight_requantizes_in_place():
    q = NF4Linear.from_linear(_layer())
    w = torch.randn(70, 130)
    q.set_weight(w)
    assert (q.dequantize() - w).abs().max() < 0.2 * w.abs().max()
    with pytest.raises(LorafitError):
        q.set_weight(torch.randn(3, 3))


def test_storage_bytes_per_param():
    q = NF4Linear.from_linear(nn.Linear(576, 1536))
    nbytes, params = weight_storage_bytes(q)
    assert params == 576 * 1536 and nbytes / params <= 0.6


@pytest.mark.parametrize("shape", [(128, 70), (130, 70), (129, 70)])  # rows of whole blocks, of bytes, neither
def test_storage_as_parameters_keeps_the_weight_and_survives_a_dtype_cast(shape):
    """What FSDP2 shards: the same bytes as frozen Parameters, codes and statistics by rows where they can."""
    torch.manual_seed(0)
    q = NF4Linear.from_linear(nn.Linear(*shape, bias=False))
    x = torch.randn(2, shape[0])
    expected, nbytes, buffers = q(x), weight_storage_bytes(q), dict(q.named_buffers())
    q.storage_as_parameters()
    assert dict(q.named_buffers()) == {} and set(q.STORAGE) == set(buffers)
    assert all(not p.requires_grad for p in q.parameters())
    n_in = shape[0]
    assert q.packed.shape == ((70, n_in // 2) if n_in % 2 == 0 else buffers["packed"].shape)
    assert q.absmax.shape == ((70, n_in // 64) if n_in % 64 == 0 else buffers["absmax"].shape)
    assert q.offset.shape == (1,)
    assert torch.equal(q(x), expected) and weight_storage_bytes(q) == nbytes
    q = q.to(torch.bfloat16)  # a model-wide cast must not touch the codes or the fp32 statistics
    assert q.state2.dtype == q.offset.dtype == torch.float32 and q.packed.dtype == torch.uint8
    assert torch.equal(q(x), expected)
    q.set_weight(torch.randn(70, shape[0]))  # a requantized weight is held as buffers again
    assert set(dict(q.named_buffers())) == set(buffers) and q.STORAGE == ()
