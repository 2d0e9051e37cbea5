"""(IA)³ against the real peft package: forward, gradients, merge, files both ways (fp32, 1e-5)."""

import copy

import pytest
import torch
from peft import IA3Config as PeftIA3Config
from peft import PeftModel, get_peft_model

import lorafit as lf
from lorafit.lora.ia3 import IA3Layer
from lorafit.merge import merge_to_dense
from lorafit.quant.apply import quantize_model
from lorafit.quant.linear import NF4Linear
from tests.conftest import MAKERS

TOL = 1e-5
TARGETS = {"llama": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
           "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"])}


def _perturb(model: torch.nn.Module, seed: int = 3) -> None:
    """Vectors away from 1 (all-ones would make any loader look right)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ia3_l" in name:
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))


def _ia3_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        if "ia3_l" in name:
            key = name.replace("base_model.model.", "").replace(".ia3_l.default", "").replace(".ia3_l", "")
            out[key] = p.grad.flatten()
    return out


def test_forward_and_grads_equal_peft(family, ids):
    targets, ff = TARGETS[family]
    peft_model = get_peft_model(MAKERS[family](), PeftIA3Config(target_modules=targets, feedforward_modules=ff,
                                                              fan_in_fan_out=family == "gpt2"))
    ours = lf.apply_lora(MAKERS[family](), lf.IA3Config(target_modules=targets, feedforward_modules=ff))
    _perturb(peft_model)
    _perturb(ours)  # same seed, same parameter order: equal vectors
    for m in (peft_model, ours):
        m(ids, labels=ids).loss.backward()
    torch.testing.assert_close(ours(ids).logits, peft_model(ids).logits, atol=TOL, rtol=0)
    g_ours, g_peft = _ia3_grads(ours), _ia3_grads(peft_model)
    assert g_ours.keys() == g_peft.keys() and len(g_ours) == 2 * len(targets)
    for key in g_ours:
        torch.testing.assert_close(g_ours[key], g_peft[key], atol=TOL, rtol=0)
    assert all(not p.requires_grad for n, p in ours.named_parameters() if "ia3_l" not in n)


def test_files_both_ways(family, ids, tmp_path):
    targets, ff = TARGETS[family]
    ours = lf.apply_lora(MAKERS[family](), lf.IA3Config(target_modules=targets, feedforward_modules=ff))
    _perturb(ours)
    lf.save_adapter(ours, tmp_path / "ours")
    peft_loaded = PeftModel.from_pretrained(MAKERS[family](), tmp_path / "ours").eval()
    torch.testing.assert_close(peft_loaded(ids).logits, ours(ids).logits, atol=TOL, rtol=0)

    peft_model = get_peft_model(MAKERS[family](), PeftIA3Config(target_modules=targets, feedforward_modules=ff,
                                                              fan_in_fan_out=family == "gpt2"))
    _perturb(peft_model, seed=5)
    peft_model.save_pretrained(tmp_path / "peft")
    loaded = lf.load_adapter(MAKERS[family](), tmp_path / "peft")
    torch.testing.assert_close(loaded(ids).logits, peft_model(ids).logits, atol=TOL, rtol=0)


def test_merge_unmerge_and_defaults(family, ids):
    model = lf.apply_lora(MAKERS[family](), lf.IA3Config())  # the family's default targets
    assert {type(m) for m in model.modules()} >= {IA3Layer}
    base_logits = MAKERS[family]()(ids).logits
    _perturb(model)
    adapted = model(ids).logits
    lf.merge_adapter(model)
    torch.testing.assert_close(model(ids).logits, adapted, atol=TOL, rtol=0)
    lf.unmerge_adapter(model)
    torch.testing.assert_close(model(ids).logits, adapted, atol=TOL, rtol=0)
    with lf.disable_adapters(model):
        torch.testing.assert_close(model(ids).logits, base_logits, atol=TOL, rtol=0)
    dense = merge_to_dense(copy.deepcopy(model), dtype=torch.float32)  # what `lorafit merge --dense` writes
    assert not any(isinstance(m, IA3Layer) for m in dense.modules())
    torch.testing.assert_close(dense(ids).logits, adapted, atol=TOL, rtol=0)
    plain = lf.merge_and_unload(model)
    assert not any(isinstance(m, IA3Layer) for m in plain.modules())
    torch.testing.assert_close(plain(ids).logits, adapted, atol=TOL, rtol=0)


def test_nf4_base_matches_dequantized_reference(ids):
    """On an NF4 base the vectors act on the dequantized weight: equal to PEFT on the dequantized model."""
    model = quantize_model(MAKERS["llama"](), "nf4")
    reference = MAKERS["llama"]()
    with torch.no_grad():  # the reference holds exactly the dequantized weights
        for name, module in model.named_modules():
            if isinstance(module, NF4Linear):
                reference.get_submodule(name).weight.copy_(module.dequantize(torch.float32))
    targets, ff = TARGETS["llama"]
    lf.apply_lora(model, lf.IA3Config(target_modules=targets, feedforward_modules=ff))
    peft_model = get_peft_model(reference, PeftIA3Config(target_modules=targets, feedforward_modules=ff))
    _perturb(model)
    _perturb(peft_model)
    torch.testing.assert_close(model(ids).logits, peft_model(ids).logits, atol=TOL, rtol=0)
    lf.merge_adapter(model)  # requantizes: close, not equal
    assert torch.allclose(model(ids).logits, peft_model(ids).logits, atol=0.5)


def test_bad_input_is_one_line_and_changes_nothing():
    model = MAKERS["llama"]()
    with pytest.raises(lf.LorafitError, match="feedforward_modules"):
        lf.IA3Config(target_modules=["k_proj"], feedforward_modules=["down_proj"])
    with pytest.raises(lf.LorafitError, match="embed_tokens.*Linear, Conv1D or NF4"):
        lf.apply_lora(model, lf.IA3Config(target_modules=["embed_tokens", "k_proj"]))
    lf.apply_lora(model, lf.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(lf.LorafitError, match="cannot adapt: .*q_proj \\(LoraLayer\\)"):
        lf.add_adapter(model, lf.IA3Config(target_modules=["q_proj"]), "ia3")
    assert lf.active_adapters(model) == ["default"]
    assert not any(isinstance(m, IA3Layer) for m in model.modules())
    lf.add_adapter(model, lf.IA3Config(target_modules=["k_proj"], feedforward_modules=[]), "ia3")
    with pytest.raises(lf.LorafitError, match="plain LoRA adapters only"):
        lf.set_adapter_scale(model, "ia3", 0.5)
    before = {n: p.clone() for n, p in model.state_dict().items()}
    with pytest.raises(lf.LorafitError, match="cannot adapt: .*k_proj \\(IA3Layer\\)"):
        lf.add_adapter(model, lf.LoraConfig(r=2, target_modules=["k_proj", "v_proj"]), "lora2")
    assert before.keys() == model.state_dict().keys() and "lora2" not in lf.lora.inject.adapter_configs(model)
