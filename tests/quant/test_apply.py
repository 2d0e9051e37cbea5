import pytest
import torch
from torch import nn

from lorafit.errors import LorafitError
from lorafit.quant.apply import quantize_linear, quantize_model
from lorafit.quant.linear import NF4Linear, weight_storage_bytes
from lorafit.quant.ternary import TernaryLinear

transformers = pytest.importorskip("transformers")


def _tiny_llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("method,cls,tol", [("nf4", NF4Linear, 0.05), ("ternary", TernaryLinear, 0.5)])
def test_quantized_llama_runs_and_loss_close(method, cls, tol):
    model = _tiny_llama()
    ids = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        ref = model(ids, labels=ids).loss
    quantize_model(model, method=method)
    assert isinstance(model.lm_head, nn.Linear) and not isinstance(model.lm_head, cls)
    assert isinstance(model.model.layers[0].self_attn.q_proj, cls)
    assert not any(type(m) is nn.Linear for n, m in model.named_modules() if n != "lm_head")
    with torch.no_grad():
        loss = model(ids, labels=ids).loss
    assert torch.isfinite(loss) and abs(loss - ref) / ref < tol


def test_nf4_memory_per_param():
    model = quantize_model(_tiny_llama(), "nf4")
    nbytes, params = weight_storage_bytes(model)
    assert params == 2 * (4 * 64 * 64 - 2 * 64 * 32 + 3 * 64 * 128) and nbytes / params <= 0.6


def test_errors_name_the_layer():
    with pytest.raises(LorafitError, match="layer 'x'"):
        quantize_linear("x", nn.Linear(4, 4), "int3")
    with pytest.raises(LorafitError, match="layer 'emb'"):
        quantize_linear("emb", nn.Embedding(4, 4), "nf4")
    with pytest.raises(LorafitError, match="layer 'y'"):
        quantize_linear("y", nn.Linear(10, 4), "ternary", group_size=3)
    with pytest.raises(LorafitError):
        quantize_model(nn.Sequential(nn.Linear(4, 4)), "fp3")


def test_gpt2_conv1d_layers_are_quantized_transposed():
    """GPT-2's Conv1D keeps its weight (in, out); quantized, it is an NF4Linear of the transposed weight."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=128, n_embd=64, n_layer=1, n_head=4)).eval()
    conv = model.transformer.h[0].mlp.c_fc
    x = torch.randn(3, 64)
    quantize_model(model, "nf4")
    layer = model.transformer.h[0].mlp.c_fc
    assert isinstance(layer, NF4Linear) and not any(isinstance(m, Conv1D) for m in model.modules())
    with torch.no_grad():
        want = x @ layer.dequantize().float().T + conv.bias
        torch.testing.assert_close(layer(x), want, atol=1e-5, rtol=1e-5)
        assert (layer.dequantize().float() - conv.weight.T).abs().max() < 0.25 * conv.weight.abs().max()
