"""LoraConfig checks every field where it is written."""

import pytest

from lorafit import LoraConfig, LorafitError


@pytest.mark.parametrize("field,value", [
    ("r", 0), ("r", 2.5), ("alpha", -1), ("dropout", 1.0), ("bias", "some"), ("init", "xavier"),
    ("target_modules", []), ("target_modules", "("), ("rank_pattern", {"q": 0}), ("layers_to_transform", [-1]),
])
def test_invalid_values_name_the_field(field, value):
    with pytest.raises(LorafitError, match=f"LoraConfig.{field}"):
        LoraConfig(**{field: value})


def test_defaults_and_scaling():
    c = LoraConfig()
    assert (c.r, c.alpha, c.dropout, c.bias) == (16, 16.0, 0.0, "none")
    assert c.scaling_for("x.q_proj") == 1.0
    rs = LoraConfig(r=16, alpha=8, use_rslora=True, rank_pattern={"v_proj": 4}, alpha_pattern={"v_proj": 2})
    assert rs.scaling_for("a.q_proj") == 8 / 16**0.5
    assert rs.rank_for("model.layers.0.self_attn.v_proj") == 4 and rs.scaling_for("l.v_proj") == 2 / 4**0.5
    assert rs.rank_for("model.layers.0.self_attn.vv_proj") == 16  # patterns match on a '.' boundary


def test_from_dict_rejects_unknown_fields():
    assert LoraConfig.from_dict({"r": 4}).r == 4
    with pytest.raises(LorafitError, match="unknown field"):
        LoraConfig.from_dict({"rank": 4})


def test_unknown_init_names_the_accepted_values():
    from torch import nn

    from lorafit.config import INIT_MODES
    from lorafit.lora.layer import LoraLayer

    with pytest.raises(LorafitError, match="init") as e:
        LoraConfig(init="typo")
    assert all(mode in str(e.value) for mode in INIT_MODES)
    layer = LoraLayer(nn.Linear(8, 4))
    with pytest.raises(LorafitError) as e:
        layer.add("a", 2, 2.0, init="typo")
    assert all(mode in str(e.value) for mode in INIT_MODES)
    assert layer.adapter_names() == []  # nothing was added
