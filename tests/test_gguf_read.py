"""GGUF -> transformers conversion: Qwen2, Qwen3 and Gemma 3 files come back computing what they hold.

Each tiny model is written to an f32 GGUF by lorafit's exporter (what llama.cpp runs, tested against it in
tests/export), then converted by `load_model`: the logits and the tokenizer's ids must be the original's.
The tiny configs use what transformers' GGUF reader alone gets wrong: Qwen3's head size (32, not 128),
Gemma 3's query scale (16, not 256) and the linear rope scaling of its global layers.
"""

from __future__ import annotations

import pytest
import torch
from gguf import GGUFWriter

from lorafit.errors import LorafitError
from lorafit.export import export_gguf
from lorafit.gguf_read import config_fixes, gguf_metadata, shape_fields
from lorafit.model import load_model, resolve_model
from tests.export.kit import FAMILIES, rel_max_err, tiny_model

TEXT = "Hello, World! It's 2024-05-17; we'll see..."


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAFIT_CACHE", str(tmp_path / "cache"))


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "gemma3"])
def test_converted_gguf_computes_what_it_holds(family, tmp_path):
    tok = FAMILIES[family][1]()
    model = tiny_model(family, len(tok))
    path = export_gguf(model, tok, tmp_path / f"{family}.gguf", "f32").path
    back, back_tok = load_model(path)
    ids = tok(TEXT)["input_ids"]
    assert back_tok(TEXT)["input_ids"] == ids
    with torch.no_grad():
        want, got = model(torch.tensor([ids])).logits, back(torch.tensor([ids])).logits
    assert rel_max_err(got.numpy(), want.numpy()) <= 1e-5
    shape = shape_fields(gguf_metadata(path), path)
    assert shape["num_hidden_layers"] == model.config.num_hidden_layers and shape["vocab_size"] == len(tok)


def test_an_architecture_transformers_cannot_read_is_named(tmp_path):
    path = tmp_path / "odd.gguf"
    writer = GGUFWriter(str(path), "rwkv7")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", torch.zeros(4, 4).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(LorafitError, match=r"odd.gguf: GGUF architecture 'rwkv7' cannot be converted .*qwen3"):
        resolve_model(path)


def test_gemma3_query_scale_follows_llama_cpp():
    meta = {"general.architecture": "gemma3", "gemma3.block_count": 62, "gemma3.embedding_length": 5376,
            "gemma3.attention.head_count": 32, "gemma3.attention.key_length": 128, "tensor_names": []}
    assert config_fixes(meta)["query_pre_attn_scalar"] == 168  # the 27B: hidden / heads
    meta.update({"gemma3.block_count": 26, "gemma3.embedding_length": 1152, "gemma3.attention.head_count": 4,
                 "gemma3.attention.key_length": 256})
    assert config_fixes(meta)["query_pre_attn_scalar"] == 256  # 1B: the head size


def test_the_header_reader_reads_what_gguf_py_reads(tmp_path):
    """Every field gguf-py's GGUFReader decodes, with arrays over SKIP_ARRAYS counted, not decoded."""
    from gguf import GGUFReader

    from lorafit.gguf_read import SKIP_ARRAYS

    path = tmp_path / "fields.gguf"
    writer = GGUFWriter(str(path), "llama")
    writer.add_block_count(2)
    writer.add_float32("llama.rope.freq_base", 0.5)
    writer.add_bool("llama.flag", True)
    writer.add_array("tokenizer.ggml.tokens", [f"t{i}" for i in range(SKIP_ARRAYS + 1)])
    writer.add_array("tokenizer.ggml.scores", [0.25] * (SKIP_ARRAYS + 1))
    writer.add_array("llama.short", [1, 2, 3])
    writer.add_tensor("token_embd.weight", torch.zeros(4, 4).numpy())
    writer.add_tensor("output.weight", torch.zeros(4, 4).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    meta = gguf_metadata(path)
    reader = GGUFReader(path)
    for key, field in reader.fields.items():
        if len(field.data) > SKIP_ARRAYS:
            assert meta[key + ".length"] == len(field.data) and key not in meta
        else:
            assert meta[key] == field.contents(), key
    assert meta["tensor_names"] == [t.name for t in reader.tensors] == ["token_embd.weight", "output.weight"]
    assert meta["llama.short"] == [1, 2, 3] and meta["llama.flag"] is True
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(LorafitError, match=r"fields.gguf: not a readable GGUF file \(the file ends inside its header"):
        gguf_metadata(path)
