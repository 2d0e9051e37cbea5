"""GatedMLP: same numbers as the model's own MLP, two fewer intermediate activations kept for backward."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import lorafit as lf
from lorafit.ops.swiglu import SwiGLUFunction
from lorafit.quant.apply import quantize_model
from lorafit.train.checkpointing import enable_checkpointing
from lorafit.train.fusion import GatedMLP, fuse_gated_mlps


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_swiglu_function_matches_autograd(dtype, tol):
    gen = torch.Generator().manual_seed(0)
    g = (torch.randn(3, 5, 40, generator=gen) * 3).to(dtype).requires_grad_(True)
    u = torch.randn(3, 5, 40, generator=gen).to(dtype).requires_grad_(True)
    upstream = torch.randn(3, 5, 40, generator=gen).to(dtype)
    ref = F.silu(g) * u
    got = SwiGLUFunction.apply(g, u)
    assert torch.equal(got, ref)  # forward: the same two ops
    ref_grads = torch.autograd.grad(ref, [g, u], upstream)
    got_grads = torch.autograd.grad(got, [g, u], upstream)
    for a, b in zip(got_grads, ref_grads):
        assert (a.float() - b.float()).abs().max().item() <= tol * b.float().abs().max().item()


def _tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config)


def _adapted(quant: str | None, fused: bool, checkpointing: bool = False) -> LlamaForCausalLM:
    model = _tiny_llama()
    if quant:
        model = quantize_model(model, quant)
    lf.apply_lora(model, lf.LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    torch.manual_seed(1)
    with torch.no_grad():  # non-zero B, so the adapters change every output
        for p in lf.adapter_parameters(model):
            p.normal_(std=0.05)
    if fused:
        assert fuse_gated_mlps(model) == 2
    if checkpointing:
        enable_checkpointing(model)
    return model


@pytest.mark.parametrize("quant", [None, "nf4"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_fused_model_matches_plain_model(quant, checkpointing):
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(2))
    results = []
    for fused in (False, True):
        model = _adapted(quant, fused, checkpointing)
        model.train()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((loss.detach(), grads, sorted(model.state_dict())))
    (loss0, grads0, keys0), (loss1, grads1, keys1) = results
    assert torch.equal(loss0, loss1)  # forward is bit for bit the same
    assert keys0 == keys1  # same parameter names: adapters and checkpoints are unaffected
    assert grads0.keys() == grads1.keys()
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], rtol=1e-5, atol=1e-7, msg=name)


def test_product_is_not_kept_for_backward():
    """The plain MLP keeps silu(g) * u alive until backward (down_proj's LoRA needs it); GatedMLP
    drops it after forward and rebuilds it when backward asks."""
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(3))
    alive = {}
    for fused in (False, True):
        model = _adapted(None, fused)
        seen: list[weakref.ref] = []
        mlp = model.model.layers[0].mlp
        mlp.down_proj.register_forward_pre_hook(lambda module, args, seen=seen: seen.append(weakref.ref(args[0])))
        loss = model(input_ids=ids, labels=ids).loss
        gc.collect()
        alive[fused] = seen[0]() is not None
        loss.backward()
    assert alive == {False: True, True: False}


def test_other_mlps_are_left_alone():
    class GeluMLP(nn.Module):  # Gemma-style: same children, another activation
        def __init__(self) -> None:
            super().__init__()
            self.gate_proj, self.up_proj = nn.Linear(8, 16), nn.Linear(8, 16)
            self.down_proj = nn.Linear(16, 8)

        def forward(self, x):
            return self.down_proj(F.gelu(self.gate_proj(x)) * self.up_proj(x))

    model = nn.Sequential(GeluMLP())
    assert fuse_gated_mlps(model) == 0 and isinstance(model[0], GeluMLP)
    llama = _tiny_llama()
    assert fuse_gated_mlps(llama) == 2 and isinstance(llama.model.layers[1].mlp, GatedMLP)
    assert fuse_gated_mlps(llama) == 0  # already fused


def test_rmsnorms_fused_where_the_kernel_runs(triton_device):
    """Every RMSNorm of a tiny Llama becomes a FusedRMSNorm over the same weight; the model's loss and
    adapter gradients stay those of the module path (to fp32 rounding: the kernel sums in another order)."""
    from lorafit.train.fusion import FusedRMSNorm, fuse_rmsnorms

    def run(fuse: bool):
        torch.manual_seed(0)
        model = _tiny_llama().to(triton_device)
        lf.apply_lora(model, lf.LoraConfig(r=4, target_modules="all-linear", init="random"))
        if fuse:
            assert fuse_rmsnorms(model) == 2 * model.config.num_hidden_layers + 1
            assert isinstance(model.model.norm, FusedRMSNorm)
            assert model.model.norm.weight is dict(model.named_parameters())["model.norm.weight"]
        ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(1)).to(triton_device)
        loss = model(ids, labels=ids).loss
        loss.backward()
        return loss.item(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    (loss_ref, grads_ref), (loss, grads) = run(False), run(True)
    assert abs(loss - loss_ref) <= 1e-5 * abs(loss_ref)
    for name, g in grads_ref.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-6)


def test_rmsnorms_stay_where_the_kernel_does_not_run(monkeypatch):
    from lorafit.train.fusion import fuse_rmsnorms

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert fuse_rmsnorms(_tiny_llama()) == 0
