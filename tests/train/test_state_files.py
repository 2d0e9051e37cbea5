"""Trainer state files: a tree of containers, numbers and tensors through JSON + safetensors and back."""

from __future__ import annotations

import math

import pytest
import torch

from lorafit.errors import LorafitError
from lorafit.train.state_files import STATE_JSON, STATE_TENSORS, has_state, load_state, save_state


def test_a_state_comes_back_as_it_went_in(tmp_path):
    rng = torch.get_rng_state()
    state = {"step": 3, "best": math.inf, "worst": -math.inf, "history": [{"loss": 1.5, "val": None}],
             "optimizer": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(2, 3)}},
                           "param_groups": [{"betas": (0.9, 0.999), "params": [0]}]},
             "rng": rng, "rank_rng": [(rng, None)], "__tensor__": "a key that looks like a tag", "text": "ok"}
    save_state(state, tmp_path)
    assert has_state(tmp_path) and sorted(p.name for p in tmp_path.iterdir()) == [STATE_JSON, STATE_TENSORS]
    back = load_state(tmp_path)
    assert back["best"] == math.inf and back["worst"] == -math.inf and back["text"] == "ok"
    assert back["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.999)  # a tuple again
    assert list(back["optimizer"]["state"]) == [0]  # an int key again
    assert torch.equal(back["optimizer"]["state"][0]["exp_avg"], state["optimizer"]["state"][0]["exp_avg"])
    assert torch.equal(back["rank_rng"][0][0], rng) and back["__tensor__"] == state["__tensor__"]
    assert math.isnan(load_state(_saved(tmp_path / "nan", {"x": math.nan}))["x"])


def _saved(folder, state):
    folder.mkdir()
    save_state(state, folder)
    return folder


def test_only_data_is_written_and_a_broken_file_is_one_line(tmp_path):
    with pytest.raises(TypeError, match="cannot write a object"):
        save_state({"x": object()}, tmp_path)
    folder = _saved(tmp_path / "ok", {"x": torch.ones(2)})
    (folder / STATE_TENSORS).write_bytes(b"not safetensors")
    with pytest.raises(LorafitError, match="trainer_state.safetensors: not a readable safetensors file") as e:
        load_state(folder)
    assert "\n" not in str(e.value)
