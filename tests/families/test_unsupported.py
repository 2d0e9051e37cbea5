"""Families that cannot work end in one line naming what is missing, before anything is computed."""

from __future__ import annotations

import json

import pytest
import transformers as t

from lorafit.errors import LorafitError
from lorafit.model import load_model
from lorafit.serve.engine import Engine
from tests.families.kit import tokenizer


def test_a_config_without_a_causal_lm_is_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(t.ViTConfig(hidden_size=32, num_hidden_layers=1).to_dict()))
    with pytest.raises(LorafitError, match=r"config.json: model_type 'vit' has no causal language model") as e:
        load_model(tmp_path)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("make, says", [
    (lambda n: t.RwkvForCausalLM(t.RwkvConfig(vocab_size=n, hidden_size=32, num_hidden_layers=2, attention_hidden_size=32,
                                               intermediate_size=64)),
     r"RwkvForCausalLM: serving keeps each row's state in transformers' cache, and 'rwkv' takes no cache argument "
     r"\(it passes its own `state`\)"),
    (lambda n: t.xLSTMForCausalLM(t.xLSTMConfig(vocab_size=n, hidden_size=32, num_hidden_layers=1, num_heads=2)),
     r"xLSTMForCausalLM: serving keeps each row's state in transformers' cache, and 'xlstm' keeps its state in its "
     r"own xLSTMCache")])
def test_serving_a_model_whose_state_is_outside_the_cache_is_refused(make, says):
    """Recurrent layers whose state lives in transformers' cache are served (test_serve.py: Qwen3.5, Granite 4,
    LFM2, ...); a model that keeps its state elsewhere cannot have it split by row, and says so."""
    tok = tokenizer()
    with pytest.raises(LorafitError, match=says) as e:
        Engine(make(len(tok)), tok)
    assert "\n" not in str(e.value)


def test_training_a_lora_that_a_fused_kernel_would_skip_is_refused(tmp_path):
    """Granite 4's Mamba layers train through a fused kernel that reads mamba.out_proj's weight itself: a LoRA
    there would not train (PEFT's is silently left out). Named in one line, before the model is changed."""
    import lorafit as lf
    from lorafit.train.data import Record, tokenize_record
    from lorafit.train.trainer import TrainConfig, Trainer
    from tests.families.kit import make_model

    tok = tokenizer()
    model = make_model("granitemoehybrid", tok)
    before = {n: p.clone() for n, p in model.state_dict().items()}
    config = TrainConfig(output_dir=str(tmp_path), lora=lf.LoraConfig(r=4, target_modules="all-linear"), max_steps=1)
    with pytest.raises(LorafitError, match=r"granitemoehybrid: model.layers.0.mamba.out_proj is read by weight in a "
                                           r"fused training kernel .* leave mamba.out_proj out of target_modules") as e:
        Trainer(config, model, tok, [tokenize_record(tok, Record("alpaca", {"instruction": "a", "output": "b"}, "m"))])
    assert "\n" not in str(e.value)
    assert model.state_dict().keys() == before.keys()  # no adapter was added
