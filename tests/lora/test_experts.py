"""LoRA on MoE expert weights (target_parameters) on a tiny random Mixtral, against the real peft package."""

import math

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from transformers import MixtralConfig, MixtralForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM

import lorafit as lf
from lorafit.lora.experts import ExpertLoraLayer

TOL = 1e-5
EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]
MIXTRAL = MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64)


QWEN2_MOE = Qwen2MoeConfig(vocab_size=64, hidden_size=32, intermediate_size=16, moe_intermediate_size=16,
                           shared_expert_intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, max_position_embeddings=64)


def make_mixtral(seed: int = 0) -> MixtralForCausalLM:
    torch.manual_seed(seed)
    return MixtralForCausalLM(MIXTRAL).eval()


def make_qwen2_moe(seed: int = 0) -> Qwen2MoeForCausalLM:
    """Qwen2-MoE: fused experts next to a plain-Linear shared expert, so one adapter can hold both kinds."""
    torch.manual_seed(seed)
    return Qwen2MoeForCausalLM(QWEN2_MOE).eval()


# family -> (maker, target_modules next to the experts: Qwen2-MoE's shared expert is plain Linear)
MOE = {"mixtral": (make_mixtral, None), "qwen2_moe": (make_qwen2_moe, ["gate_proj", "up_proj", "down_proj"])}


@pytest.fixture
def moe_ids() -> torch.Tensor:
    return torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(1))


def _perturb(model: torch.nn.Module, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def test_trains_only_the_adapters(moe_ids):
    model = lf.apply_lora(make_mixtral(), lf.LoraConfig(r=2, target_parameters=EXPERTS, init="random"))
    assert sum(isinstance(m, ExpertLoraLayer) for m in model.modules()) == MIXTRAL.num_hidden_layers
    trainable = lf.adapter_parameters(model)
    assert trainable and all(".lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    model.train()
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    before = [p.detach().clone() for p in trainable]
    model(moe_ids, labels=moe_ids).loss.backward()
    router = model.model.layers[0].mlp.gate.weight
    assert router.grad is None and not router.requires_grad  # the router stays frozen
    assert all(p.grad is None for n, p in model.named_parameters() if ".lora_" not in n)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)
    opt.step()
    assert all(not torch.equal(a, p) for a, p in zip(before, trainable))


def test_trainer_trains_expert_adapters(moe_ids, tmp_path):
    """Two Trainer steps on an expert-only adapter: the base and the router are untouched, the adapter
    moved and its saved file reloads to the trained model's logits."""
    from types import SimpleNamespace

    from lorafit.train.data.tokenize import Sample
    from lorafit.train.trainer import TrainConfig, Trainer

    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(1, 64, (8,), generator=g).tolist() for _ in range(4)]
    samples = [Sample(input_ids=r, labels=r, source=f"row:{i}") for i, r in enumerate(rows)]
    model = make_mixtral()
    base = {n: p.clone() for n, p in model.state_dict().items()}
    config = TrainConfig(output_dir=str(tmp_path), lora=lf.LoraConfig(r=2, target_parameters=EXPERTS),
                         max_steps=2, batch_size=2, learning_rate=1e-2, warmup_ratio=0.0)
    history = Trainer(config, model, SimpleNamespace(pad_token_id=0), samples).train()
    assert len(history) == 2 and all(math.isfinite(h["loss"]) for h in history)
    state = model.state_dict()
    moved = [k for k in state if ".lora_B." in k and state[k].abs().sum() > 0]
    assert moved  # B starts at zero: any non-zero B was trained
    for name, tensor in base.items():  # every base tensor (router included) is exactly as it was
        key = name.replace("mlp.experts.", "mlp.experts.base_layer.")
        assert torch.equal(state[key if key in state else name], tensor), name
    reloaded = lf.load_adapter(make_mixtral(), tmp_path / "adapter")
    torch.testing.assert_close(reloaded(moe_ids).logits, model(moe_ids).logits, atol=TOL, rtol=0)


@pytest.mark.parametrize("family", list(MOE))
def test_ours_loads_in_peft_and_back(family, moe_ids, tmp_path):
    make, modules = MOE[family]
    model = lf.apply_lora(make(), lf.LoraConfig(r=2, alpha=4, target_parameters=EXPERTS, target_modules=modules))
    _perturb(model)
    ours = model(moe_ids).logits
    assert (ours - make()(moe_ids).logits).abs().max() > 1e-3  # the adapter does something
    lf.save_adapter(model, tmp_path / "ours")
    peft_model = PeftModel.from_pretrained(make(), tmp_path / "ours").eval()
    torch.testing.assert_close(peft_model(moe_ids).logits, ours, atol=TOL, rtol=0)
    again = lf.load_adapter(make(), tmp_path / "ours")
    torch.testing.assert_close(again(moe_ids).logits, ours, atol=TOL, rtol=0)


@pytest.mark.parametrize("family, params", [("mixtral", EXPERTS), ("mixtral", ["experts.down_proj"]),
                                            ("qwen2_moe", EXPERTS)])
def test_peft_loads_in_ours(family, params, moe_ids, tmp_path):
    make, modules = MOE[family]
    peft_model = get_peft_model(make(), PeftLoraConfig(r=2, lora_alpha=4, target_modules=modules or [],
                                                       target_parameters=params)).eval()
    _perturb(peft_model)
    peft_model.save_pretrained(tmp_path)
    ours = lf.load_adapter(make(), tmp_path)
    torch.testing.assert_close(ours(moe_ids).logits, peft_model(moe_ids).logits, atol=TOL, rtol=0)


def test_merge_equals_unmerged_and_serving_refuses(moe_ids):
    model = lf.apply_lora(make_mixtral(), lf.LoraConfig(r=2, target_parameters=EXPERTS, target_modules=["q_proj"]))
    _perturb(model)
    adapted = model(moe_ids).logits
    with pytest.raises(lf.LorafitError, match="per-row serving"), lf.adapter_per_row(model, ["default", None]):
        pass
    lf.merge_adapter(model)
    torch.testing.assert_close(model(moe_ids).logits, adapted, atol=TOL, rtol=0)
    lf.unmerge_adapter(model)
    torch.testing.assert_close(model(moe_ids).logits, adapted, atol=TOL, rtol=0)
    plain = lf.merge_and_unload(model)
    assert not any(isinstance(m, ExpertLoraLayer) for m in plain.modules())
    torch.testing.assert_close(plain(moe_ids).logits, adapted, atol=TOL, rtol=0)


@pytest.mark.parametrize("target", ["experts.nothing", "gate.weight"])
def test_bad_target_is_one_line_and_changes_nothing(target):
    model = make_mixtral()
    before = {n: p.clone() for n, p in model.state_dict().items()}
    with pytest.raises(lf.LorafitError, match="3-D") as err:
        lf.apply_lora(model, lf.LoraConfig(r=2, target_parameters=[target]))
    assert "\n" not in str(err.value)
    assert not any(isinstance(m, ExpertLoraLayer) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())


def test_transposed_layout_gpt_oss(moe_ids, tmp_path):
    """GPT-OSS stores experts (E, in, out) (`is_transposed`); PEFT reads the same file to equal logits."""
    from transformers import GptOssConfig, GptOssForCausalLM

    config = GptOssConfig(vocab_size=64, hidden_size=32, intermediate_size=16, num_hidden_layers=1, num_attention_heads=4,
                          num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, head_dim=8,
                          max_position_embeddings=64, layer_types=["full_attention"])

    def make() -> GptOssForCausalLM:
        torch.manual_seed(0)
        return GptOssForCausalLM(config).eval()

    model = lf.apply_lora(make(), lf.LoraConfig(r=2, target_parameters=EXPERTS))
    assert model.model.layers[0].mlp.experts.transposed
    _perturb(model)
    adapted = model(moe_ids).logits
    lf.save_adapter(model, tmp_path)
    peft_model = PeftModel.from_pretrained(make(), tmp_path).eval()
    torch.testing.assert_close(peft_model(moe_ids).logits, adapted, atol=TOL, rtol=0)
    lf.merge_adapter(model)
    torch.testing.assert_close(model(moe_ids).logits, adapted, atol=TOL, rtol=0)
