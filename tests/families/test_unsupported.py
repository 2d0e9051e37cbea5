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


def test_serving_a_recurrent_state_model_is_refused():
    tok = tokenizer()
    mamba = t.MambaForCausalLM(t.MambaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, state_size=4))
    with pytest.raises(LorafitError, match=r"MambaForCausalLM: serving needs attention's key/value cache, and "
                                           r"'mamba' keeps a recurrent state") as e:
        Engine(mamba, tok)
    assert "\n" not in str(e.value)
