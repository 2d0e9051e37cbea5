"""Adapters move both ways between lorafit and the real `peft` package, logits equal to 1e-5 (fp32)."""

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model

import lorafit as lf
from tests.conftest import MAKERS

TOL = 1e-5
TARGETS = {"llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
           "gpt2": ["c_attn", "c_proj", "c_fc"]}


def _perturb(model: torch.nn.Module, seed: int = 3) -> None:
    """Give every adapter tensor random values: a zero B would make any loader look correct."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if "magnitude" in name else 0.0))


OURS = [
    dict(),
    dict(use_rslora=True),
    dict(use_dora=True),
    dict(init="pissa"),
    dict(bias="all"),
    dict(target_modules="all-linear", modules_to_save=["lm_head"]),
]


@pytest.mark.parametrize("kw", OURS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "plain")
def test_ours_loads_in_peft(family, kw, ids, tmp_path):
    model = MAKERS[family]()
    config = lf.LoraConfig(r=8, alpha=16, **{"target_modules": TARGETS[family], **kw})
    lf.apply_lora(model, config)
    _perturb(model)
    if kw.get("bias") == "all":
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.add_(0.05)
    ours = model(ids).logits
    lf.save_adapter(model, tmp_path)

    base = MAKERS[family]()  # a fresh base: trained biases (bias="all") must come from the file
    peft_model = PeftModel.from_pretrained(base, tmp_path).eval()
    torch.testing.assert_close(peft_model(ids).logits, ours, atol=TOL, rtol=0)


@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("dora", [False, True])
def test_peft_loads_in_ours(family, rslora, dora, ids, tmp_path):
    peft_model = get_peft_model(MAKERS[family](), PeftLoraConfig(
        r=8, lora_alpha=16, target_modules=TARGETS[family], use_rslora=rslora, use_dora=dora,
        fan_in_fan_out=family == "gpt2")).eval()
    _perturb(peft_model)
    expected = peft_model(ids).logits
    peft_model.save_pretrained(tmp_path)

    model = MAKERS[family]()
    lf.load_adapter(model, tmp_path)
    torch.testing.assert_close(model(ids).logits, expected, atol=TOL, rtol=0)


@pytest.mark.parametrize("dora", [False, True])
def test_gradients_match_peft(dora, ids):
    """Same loss and the same adapter gradients as PEFT for one backward pass (DoRA's detached norm too)."""
    peft_model = get_peft_model(MAKERS["llama"](), PeftLoraConfig(
        r=8, lora_alpha=16, target_modules=TARGETS["llama"], use_dora=dora))
    _perturb(peft_model)
    ours = MAKERS["llama"]()
    lf.apply_lora(ours, lf.LoraConfig(r=8, alpha=16, target_modules=TARGETS["llama"], use_dora=dora))
    theirs = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for path, layer in lf.lora.inject.lora_layers(ours):
            pre = f"base_model.model.{path}"
            layer.lora_A["default"].copy_(theirs[f"{pre}.lora_A.default.weight"])
            layer.lora_B["default"].copy_(theirs[f"{pre}.lora_B.default.weight"])
            if dora:
                layer.lora_magnitude["default"].copy_(theirs[f"{pre}.lora_magnitude_vector.default.weight"])
    loss_theirs = peft_model(ids, labels=ids).loss
    loss_theirs.backward()
    loss_ours = ours(ids, labels=ids).loss
    loss_ours.backward()
    torch.testing.assert_close(loss_ours, loss_theirs, atol=1e-6, rtol=0)
    for path, layer in lf.lora.inject.lora_layers(ours):
        pre = f"base_model.model.{path}"
        torch.testing.assert_close(layer.lora_A["default"].grad, theirs[f"{pre}.lora_A.default.weight"].grad,
                                   atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(layer.lora_B["default"].grad, theirs[f"{pre}.lora_B.default.weight"].grad,
                                   atol=1e-5, rtol=1e-4)
        if dora:
            torch.testing.assert_close(layer.lora_magnitude["default"].grad,
                                       theirs[f"{pre}.lora_magnitude_vector.default.weight"].grad,
                                       atol=1e-5, rtol=1e-4)
