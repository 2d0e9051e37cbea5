"""AdaLoRA against the real peft package on tiny Llama and GPT-2 (fp32, 1e-5): forward, gradients with
the orthogonality regularizer, files both ways with a pruned rank_pattern, and the rank allocator."""

import pytest
import torch
from peft import AdaLoraConfig as PeftAdaLoraConfig
from peft import PeftModel, get_peft_model

import lorafit as lf
from lorafit.lora.adalora import SVDLayer, orthogonality_regularizer
from lorafit.lora.allocator import RankAllocator
from lorafit.lora.inject import adapter_configs
from tests.conftest import MAKERS

TOL = 1e-5
TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_fc"]}
SCHEDULE = dict(init_r=4, target_r=2, tinit=1, tfinal=2, deltaT=1, total_step=8)


def _peft(family: str):
    config = PeftAdaLoraConfig(**SCHEDULE, lora_alpha=8, target_modules=TARGETS[family], fan_in_fan_out=family == "gpt2",
                               task_type="CAUSAL_LM")  # (PeftModelForCausalLM adds the regularizer to the loss)
    return get_peft_model(MAKERS[family](), config)


def _ours(family: str):
    return lf.apply_lora(MAKERS[family](), lf.AdaLoraConfig(**SCHEDULE, alpha=8, target_modules=TARGETS[family]))


def _adapter_tensors(model) -> dict[str, torch.nn.Parameter]:
    """Adapter parameters by a name both sides share: '<module path>.lora_X'."""
    return {n.replace("base_model.model.", "").replace(".default", ""): p
            for n, p in model.named_parameters() if ".lora_" in n}


def _same_random_weights(peft_model, ours, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    theirs, mine = _adapter_tensors(peft_model), _adapter_tensors(ours)
    assert theirs.keys() == mine.keys() and theirs
    with torch.no_grad():
        for name in sorted(theirs):
            value = torch.randn(theirs[name].shape, generator=g) * (0.5 if name.endswith("lora_E") else 0.2)
            theirs[name].copy_(value)
            mine[name].copy_(value)


def test_forward_and_grads_equal_peft(family, ids):
    peft_model, ours = _peft(family), _ours(family)
    _same_random_weights(peft_model, ours)
    peft_loss = peft_model(ids, labels=ids).loss  # PEFT adds orth_reg_weight * R to the loss itself
    our_out = ours(ids, labels=ids)
    our_loss = our_out.loss + 0.5 * orthogonality_regularizer(ours, "default")
    torch.testing.assert_close(our_out.logits, peft_model(ids).logits, atol=TOL, rtol=0)
    torch.testing.assert_close(our_loss, peft_loss, atol=TOL, rtol=0)
    peft_loss.backward()
    our_loss.backward()
    theirs, mine = _adapter_tensors(peft_model), _adapter_tensors(ours)
    for name in theirs:
        torch.testing.assert_close(mine[name].grad, theirs[name].grad, atol=TOL, rtol=0)
    assert all(".lora_" in n for n, p in ours.named_parameters() if p.requires_grad)


def _drive(models, steps: int, seed: int = 0) -> list[list[dict]]:
    """Run the same allocator steps on each (model, allocate) pair: identical gradients and identical
    small weight updates, so both sides see the same importance scores. Returns the patterns seen."""
    g = torch.Generator().manual_seed(seed)
    seen = [[] for _ in models]
    for step in range(steps):
        tensors = [_adapter_tensors(m) for m, _ in models]
        for name in sorted(tensors[0]):
            grad = torch.randn(tensors[0][name].shape, generator=g)
            for t in tensors:
                t[name].grad = grad.clone()
                with torch.no_grad():
                    t[name].sub_(0.01 * grad)
        for i, (_, allocate) in enumerate(models):
            seen[i].append(allocate(step))
    return seen


def _peft_step(peft_model):
    def allocate(step):
        peft_model.base_model.update_and_allocate(step)
        pattern = peft_model.peft_config["default"].rank_pattern or {}
        return {k.replace(".lora_E", "").replace(".default", ""): list(v) for k, v in pattern.items()}
    return allocate


def _our_step(model):
    allocator = RankAllocator(model, adapter_configs(model)["default"], "default", SCHEDULE["total_step"])

    def allocate(step):
        allocator.update_and_allocate(step)
        return dict(adapter_configs(model)["default"].rank_pattern or {})
    return allocate


def test_allocator_keeps_the_same_ranks_as_peft(family):
    peft_model, ours = _peft(family), _ours(family)
    _same_random_weights(peft_model, ours)
    seen_peft, seen_ours = _drive([(peft_model, _peft_step(peft_model)), (ours, _our_step(ours))],
                                  SCHEDULE["total_step"])
    assert seen_ours == seen_peft
    final = seen_ours[-1]
    assert sum(sum(m) for m in final.values()) == SCHEDULE["target_r"] * len(final)  # the final budget
    theirs, mine = _adapter_tensors(peft_model), _adapter_tensors(ours)
    for name in theirs:
        torch.testing.assert_close(mine[name], theirs[name], atol=TOL, rtol=0)  # same λ zeroed


def test_files_both_ways_with_rank_pattern(family, ids, tmp_path):
    peft_model, ours = _peft(family), _ours(family)
    _same_random_weights(peft_model, ours)
    _drive([(peft_model, _peft_step(peft_model)), (ours, _our_step(ours))], SCHEDULE["total_step"] - 1)
    pattern = adapter_configs(ours)["default"].rank_pattern
    assert pattern and any(not all(m) for m in pattern.values())  # something was pruned

    lf.save_adapter(ours, tmp_path / "ours")
    peft_loaded = PeftModel.from_pretrained(MAKERS[family](), tmp_path / "ours").eval()
    torch.testing.assert_close(peft_loaded(ids).logits, ours(ids).logits, atol=TOL, rtol=0)

    peft_model.eval().save_pretrained(tmp_path / "peft")
    loaded = lf.load_adapter(MAKERS[family](), tmp_path / "peft")
    torch.testing.assert_close(loaded(ids).logits, peft_model(ids).logits, atol=TOL, rtol=0)
    kept = {p: m.lora_A["default"].shape[0] for p, m in loaded.named_modules() if isinstance(m, SVDLayer)}
    assert kept == {p: sum(m) for p, m in adapter_configs(loaded)["default"].rank_pattern.items()}
    lf.save_adapter(loaded, tmp_path / "again")  # a loaded, pruned adapter saves and reloads as it is
    again = lf.load_adapter(MAKERS[family](), tmp_path / "again")
    torch.testing.assert_close(again(ids).logits, peft_model(ids).logits, atol=TOL, rtol=0)


def test_merge_equals_unmerged(ids):
    model = _ours("llama")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_E" in name:
                p.normal_()
    adapted = model(ids).logits
    lf.merge_adapter(model)
    torch.testing.assert_close(model(ids).logits, adapted, atol=TOL, rtol=0)
    plain = lf.merge_and_unload(model)
    assert not any(isinstance(m, SVDLayer) for m in plain.modules())
    torch.testing.assert_close(plain(ids).logits, adapted, atol=TOL, rtol=0)


def test_bad_config_is_one_line():
    with pytest.raises(lf.LorafitError, match="target_r"):
        lf.AdaLoraConfig(init_r=4, target_r=8)
    with pytest.raises(lf.LorafitError, match="tinit"):
        lf.AdaLoraConfig(tinit=5, tfinal=5, total_step=10)
    model = MAKERS["llama"]()
    with pytest.raises(lf.LorafitError, match="embed_tokens"):
        lf.apply_lora(model, lf.AdaLoraConfig(target_modules=["embed_tokens", "q_proj"]))
    assert not any(isinstance(m, SVDLayer) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
