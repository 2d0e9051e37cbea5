"""The MoE families' 3-D experts (gpt-oss, Llama 4, Qwen3.5-MoE, Qwen3-Next) with `target_parameters`.

transformers 5 keeps each MoE layer's experts as stacked 3-D parameters (gpt-oss's stored (E, in, out)),
so a LoRA on "gate_proj" no longer reaches them, and an expert left frozen by mistake trains silently.
Here every expert gets its own pair, and one backward pass is checked against the router: the experts
that received a gradient in A and in B are exactly the experts the router chose for some token, layer by
layer (an expert no token was routed to gets none). PEFT loads the expert adapter with our logits.
"""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel

import lorafit as lf
from lorafit.lora.experts import ExpertLoraLayer
from tests.families.kit import EXPERTS, MOE, make_model, tokenizer

TOL = 1e-5


@pytest.fixture(scope="module")
def tok():
    return tokenizer()


def chosen_experts(outputs) -> set[int]:
    """The experts a router picked for some token: its index output (tokens, k), or, for Llama 4's router
    (scores (tokens, E), zero where not chosen, sigmoid of -inf), the columns with a non-zero score."""
    indices = [o for o in outputs if not o.is_floating_point()]
    if indices:
        return set(indices[0].flatten().tolist())
    return set((outputs[0] != 0).any(dim=0).nonzero().flatten().tolist())


@pytest.mark.parametrize("family", MOE)
def test_each_routed_expert_and_no_other_gets_a_gradient(family, tok):
    model = lf.apply_lora(make_model(family, tok), lf.LoraConfig(r=2, target_parameters=EXPERTS[family], init="random"))
    experts = {path: layer for path, layer in model.named_modules() if isinstance(layer, ExpertLoraLayer)}
    assert experts and set(EXPERTS[family]) <= {f"experts.{p}" for layer in experts.values() for p in layer.params}
    routed: dict[str, set[int]] = {}
    hooks = []
    for path in experts:
        block = path.rsplit(".", 1)[0]
        router = next(m for name, m in model.get_submodule(block).named_children() if name in ("gate", "router"))
        hooks.append(router.register_forward_hook(
            lambda _m, _i, out, path=path: routed.setdefault(path, set()).update(chosen_experts(out))))
    ids = torch.tensor([tok("the fox")["input_ids"]])  # few tokens: some experts go unrouted
    model.train()
    # a loss over every position's logits: with next-token labels the last position's output reaches no loss,
    # and an expert routed only that token in the last MoE layer rightly gets no gradient
    model(ids).logits.float().pow(2).mean().backward()
    for h in hooks:
        h.remove()
    unrouted = 0
    for path, layer in experts.items():
        n_experts = layer.dims(layer.params[0])[0]
        unrouted += n_experts - len(routed[path])
        for param in layer.params:
            for store in (layer.lora_A, layer.lora_B):
                grad = store[param]["default"].grad  # (E, r, in) / (E, out, r)
                with_grad = {e for e in range(n_experts) if grad[e].abs().sum() > 0}
                assert with_grad == routed[path], (path, param, with_grad, routed[path])
    assert unrouted > 0  # the count would mean nothing if every expert were routed


@pytest.mark.parametrize("family", MOE)
def test_peft_loads_our_expert_adapter(family, tok, tmp_path):
    ids = torch.tensor([tok("the quick brown fox jumps over the lazy dog")["input_ids"]])
    model = lf.apply_lora(make_model(family, tok), lf.LoraConfig(r=2, alpha=4, target_parameters=EXPERTS[family],
                                                                 init="random"))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        ours = model(ids).logits
        assert (ours - make_model(family, tok)(ids).logits).abs().max() > 1e-3  # the experts' adapter matters
    lf.save_adapter(model, tmp_path)
    peft = PeftModel.from_pretrained(make_model(family, tok), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(peft(ids).logits, ours, atol=TOL, rtol=0)
        torch.testing.assert_close(lf.load_adapter(make_model(family, tok), tmp_path)(ids).logits, ours, atol=TOL, rtol=0)
