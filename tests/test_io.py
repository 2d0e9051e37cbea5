"""Adapter files: round trip, format fields, and every bad input fails cleanly without touching the model."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import lorafit as lf
from lorafit.io import CONFIG_NAME, FORMAT_VERSION, WEIGHTS_NAME
from lorafit.lora.inject import lora_layers
from tests.conftest import MAKERS


def _snapshot(model):
    return {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()}


def _unchanged(model, snap):
    now = _snapshot(model)
    return now.keys() == snap.keys() and all(
        torch.equal(now[k][0], snap[k][0]) and now[k][1] == snap[k][1] for k in snap)


def _saved_adapter(tmp_path, family="llama", **kw):
    model = MAKERS[family]()
    lf.apply_lora(model, lf.LoraConfig(r=4, init="random", **kw))
    lf.save_adapter(model, tmp_path)
    return model


def test_files_and_version_field(tmp_path):
    _saved_adapter(tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["peft_type"] == "LORA" and config["lorafit_format_version"] == FORMAT_VERSION
    assert config["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    keys = load_file(tmp_path / WEIGHTS_NAME).keys()
    assert all(k.startswith("base_model.model.model.layers.") for k in keys)
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert not list(tmp_path.glob(".*tmp"))  # no temp files left behind


def test_round_trip_onto_bare_model(ids, tmp_path):
    model = _saved_adapter(tmp_path, use_dora=True)
    bare = MAKERS["llama"]()
    lf.load_adapter(bare, tmp_path, adapter="mine")
    assert lf.active_adapters(bare) == ["mine"]
    torch.testing.assert_close(bare(ids).logits, model(ids).logits, atol=1e-6, rtol=0)


def test_unknown_target_lists_linear_names():
    model = MAKERS["llama"]()
    snap = _snapshot(model)
    with pytest.raises(lf.LorafitError) as err:
        lf.apply_lora(model, lf.LoraConfig(target_modules=["qproj"]))
    message = str(err.value)
    assert "['qproj'] matched no module" in message and "\n" not in message
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"):
        assert name in message
    assert _unchanged(model, snap) and not list(lora_layers(model))


def test_targeting_a_norm_layer_is_refused():
    model = MAKERS["llama"]()
    with pytest.raises(lf.LorafitError, match="input_layernorm.*LlamaRMSNorm"):
        lf.apply_lora(model, lf.LoraConfig(target_modules=["input_layernorm"]))
    assert not list(lora_layers(model))


def test_shape_mismatch_names_key_and_shapes(tmp_path):
    _saved_adapter(tmp_path, family="llama")
    other = MAKERS["gpt2"]()  # different base: no q_proj at all
    with pytest.raises(lf.AdapterError, match="another base model"):
        lf.load_adapter(other, tmp_path)
    # same names, wrong width: shrink one tensor in the file
    tensors = load_file(tmp_path / WEIGHTS_NAME)
    key = "base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"
    tensors[key] = tensors[key][:, :100].contiguous()
    save_file(tensors, tmp_path / WEIGHTS_NAME)
    model = MAKERS["llama"]()
    snap = _snapshot(model)
    with pytest.raises(lf.AdapterError) as err:
        lf.load_adapter(model, tmp_path)
    message = str(err.value)
    assert "model.layers.1.mlp.down_proj.A" in message and "(4, 100)" in message and "(4, 128)" in message
    assert _unchanged(model, snap) and not list(lora_layers(model))


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupted_weights_file(tmp_path, damage):
    _saved_adapter(tmp_path)
    path = tmp_path / WEIGHTS_NAME
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"\x00\xff" * 999, "empty": b""}[damage])
    model = MAKERS["llama"]()
    lf.apply_lora(model, lf.LoraConfig(r=2), adapter="existing")  # already adapted: must stay so
    snap = _snapshot(model)
    with pytest.raises(lf.AdapterError) as err:
        lf.load_adapter(model, tmp_path, adapter="new")
    message = str(err.value)
    assert str(path) in message and "\n" not in message and "corrupted" in message
    assert _unchanged(model, snap) and lf.active_adapters(model) == ["existing"]


def test_missing_files_and_bad_config(tmp_path):
    model = MAKERS["llama"]()
    with pytest.raises(lf.AdapterError, match="adapter folder not found"):
        lf.load_adapter(model, tmp_path / "nope")
    _saved_adapter(tmp_path)
    (tmp_path / CONFIG_NAME).write_text("{not json")
    with pytest.raises(lf.AdapterError, match=f"{CONFIG_NAME}: not valid JSON"):
        lf.load_adapter(model, tmp_path)
    (tmp_path / CONFIG_NAME).write_text(json.dumps({"peft_type": "LORA", "r": 4, "lorafit_format_version": 99}))
    with pytest.raises(lf.AdapterError, match="newer than this lorafit"):
        lf.load_adapter(model, tmp_path)
    (tmp_path / CONFIG_NAME).unlink()
    with pytest.raises(lf.AdapterError, match=f"{CONFIG_NAME}: missing"):
        lf.load_adapter(model, tmp_path)
    assert not list(lora_layers(model))


def test_duplicate_adapter_name_is_refused(tmp_path):
    model = _saved_adapter(tmp_path)
    with pytest.raises(lf.LorafitError, match="already loaded"):
        lf.load_adapter(model, tmp_path, adapter="default")
    with pytest.raises(lf.LorafitError, match="no dots"):
        lf.load_adapter(model, tmp_path, adapter="a.b")


def test_load_without_activating_leaves_outputs_unchanged(ids, tmp_path):
    """activate=False means it, on a bare model and on a model with another active adapter: the outputs
    stay what they were, and the loaded adapter is frozen until set_adapter activates it."""
    trained = _saved_adapter(tmp_path / "a")
    with torch.no_grad():
        adapted = trained(ids).logits

    bare = MAKERS["llama"]()
    with torch.no_grad():
        before = bare(ids).logits
    lf.load_adapter(bare, tmp_path / "a", adapter="a", activate=False)
    assert lf.active_adapters(bare) == []
    assert not any(p.requires_grad for p in bare.parameters())
    with torch.no_grad():
        torch.testing.assert_close(bare(ids).logits, before, rtol=0, atol=0)
    lf.set_adapter(bare, "a")
    with torch.no_grad():
        torch.testing.assert_close(bare(ids).logits, adapted, rtol=0, atol=1e-5)

    other = MAKERS["llama"]()
    lf.apply_lora(other, lf.LoraConfig(r=2, init="random"), "b")
    with torch.no_grad():
        before = other(ids).logits
    lf.load_adapter(other, tmp_path / "a", adapter="a", activate=False)
    assert lf.active_adapters(other) == ["b"]
    with torch.no_grad():
        torch.testing.assert_close(other(ids).logits, before, rtol=0, atol=0)
    trainable = {n for n, p in other.named_parameters() if p.requires_grad}
    assert trainable and all(".b" in n for n in trainable)


def test_add_adapter_state_loads_what_read_adapter_parsed(ids, tmp_path):
    """read_adapter + add_adapter_state is load_adapter: a caller can inspect the parsed adapter in between."""
    from lorafit.io import add_adapter_state, read_adapter

    model = _saved_adapter(tmp_path)
    config, state = read_adapter(tmp_path)
    bare = MAKERS["llama"]()
    add_adapter_state(bare, config, state, "mine", activate=True, source=str(tmp_path))
    torch.testing.assert_close(bare(ids).logits, model(ids).logits, atol=1e-6, rtol=0)
    other = MAKERS["gpt2"]()
    snap = _snapshot(other)
    with pytest.raises(lf.AdapterError, match=f"{tmp_path}.*another base model"):
        add_adapter_state(other, config, state, "mine", source=str(tmp_path))
    assert _unchanged(other, snap)
