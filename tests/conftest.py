"""Shared fixtures: tiny real transformers models built from configs (random weights, seconds)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

LLAMA = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
GPT2 = GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                  bos_token_id=0, eos_token_id=0)


def make_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LLAMA).eval()


def make_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2).eval()
    with torch.no_grad():  # GPT-2 inits biases at zero; make them real so bias handling is tested
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.02)
    return model


MAKERS = {"llama": make_llama, "gpt2": make_gpt2}


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need CUDA: skipped (with the reason) on machines without it, as in CI.
    Where there is a GPU, the Triton kernel tests (fixture `triton_device`) run on it and count as
    `gpu` tests too, so `pytest -m gpu` covers them; elsewhere they run under the interpreter."""
    if torch.cuda.is_available():
        for item in items:
            if "triton_device" in getattr(item, "fixturenames", ()):
                item.add_marker(pytest.mark.gpu)
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is false)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=["llama", "gpt2"])
def family(request) -> str:
    return request.param


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory):
    """The bundled SmolLM2-135M-Instruct, converted from GGUF once into a repo-local cache."""
    from pathlib import Path

    from lorafit.model import resolve_model

    os.environ.setdefault("LORAFIT_CACHE", str(Path(__file__).resolve().parent.parent / ".pytest_cache" / "lorafit"))
    return resolve_model(None)


@pytest.fixture(scope="session")
def demo_adapter(smollm2_dir, tmp_path_factory):
    """(adapter folder, held-out records) of a short run of the demo's recipe (see
    tests.export.kit.train_demo_adapter), trained once per session for the export and inspect tests."""
    from tests.export.kit import train_demo_adapter

    return train_demo_adapter(tmp_path_factory.mktemp("demo"))


@pytest.fixture
def triton_device(monkeypatch) -> str:
    """Where a Triton kernel test runs: the GPU when there is one, else the CPU through the Triton
    interpreter (TRITON_INTERPRET=1, set for this test only). Skips when triton is not installed."""
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        return "cuda"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    return "cpu"
