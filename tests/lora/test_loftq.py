"""LoftQ on the real SmolLM2 weights: every adapted layer starts closer to W than plain NF4 does."""

import copy

import pytest
import torch
import torch.nn.functional as F

import lorafit as lf
from lorafit.errors import LorafitError
from lorafit.lora.inject import lora_layers
from lorafit.lora.loftq import loftq_init
from lorafit.model import load_model
from lorafit.modules import set_submodule
from lorafit.quant.apply import quantize_linear
from lorafit.quant.nf4 import quantize_nf4
from lorafit.train.data import IGNORE, DataConfig, collate, load_data
from lorafit.train.demo_task import make_dataset, write_jsonl
from tests.conftest import make_gpt2, make_llama

# the attention projections of the first and last block: 8 real matrices, seconds on 2 cores
CONFIG = dict(r=16, alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], layers_to_transform=[0, 29])


def _relative_error(W, approx):
    return float(torch.linalg.matrix_norm(W - approx) / torch.linalg.matrix_norm(W))


def test_loftq_beats_plain_nf4_on_every_smollm2_layer(smollm2_dir, tmp_path):
    fp, tokenizer = load_model(smollm2_dir)
    fp.requires_grad_(False)
    loftq, plain = copy.deepcopy(fp), copy.deepcopy(fp)
    weights = {n: m.weight.detach().clone() for n, m in fp.named_modules() if isinstance(m, torch.nn.Linear)}

    lf.apply_lora(loftq, lf.LoraConfig(init="loftq", loftq_iter=1, **CONFIG))
    layers = dict(lora_layers(loftq))
    assert len(layers) == 8
    print()
    for path, layer in layers.items():
        W = weights[path]
        Q = layer.base_layer.dequantize(torch.float32)
        ours = _relative_error(W, Q + layer.delta_weight("default"))
        nf4 = _relative_error(W, quantize_nf4(W).dequantize(torch.float32))
        print(f"{path}: relative error plain NF4 {nf4:.4f} -> LoftQ {ours:.4f} ({100 * (1 - ours / nf4):.1f}% lower)")
        assert ours < nf4
        assert type(layer.base_layer).__name__ == "NF4Linear"

    for path in layers:  # plain QLoRA on the same layers: NF4 base, B = 0
        set_submodule(plain, path, quantize_linear(path, plain.get_submodule(path)))
    lf.apply_lora(plain, lf.LoraConfig(**CONFIG))

    data = write_jsonl(tmp_path / "dates.jsonl", make_dataset(4, seed=5))
    batch = collate(load_data(tokenizer, DataConfig(path=str(data), val_fraction=0.0)).train, tokenizer.pad_token_id)
    with torch.no_grad():
        logits = {name: m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                  for name, m in (("fp", fp), ("loftq", loftq), ("plain", plain))}
    losses = {name: float(F.cross_entropy(v[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(),
                                          ignore_index=IGNORE)) for name, v in logits.items()}
    drift = {name: float((logits[name] - logits["fp"]).norm() / logits["fp"].norm()) for name in ("loftq", "plain")}
    print(f"logits' relative distance to full precision: plain {drift['plain']:.5f}, LoftQ {drift['loftq']:.5f}; "
          f"date-task loss: full {losses['fp']:.4f}, plain {losses['plain']:.4f}, LoftQ {losses['loftq']:.4f}")
    assert drift["loftq"] < drift["plain"]


def test_more_rounds_and_the_kept_round():
    W = torch.randn(48, 64, generator=torch.Generator().manual_seed(0))
    Q, A, B, errors = loftq_init(W, r=4, scaling=2.0, n_iter=3)
    assert len(errors) == 3
    kept = _relative_error(W, Q.dequantize(torch.float32) + 2.0 * B @ A)
    assert kept == pytest.approx(min(errors), rel=1e-4)
    assert min(errors) < _relative_error(W, quantize_nf4(W).dequantize(torch.float32))


def test_loftq_refuses_what_it_cannot_quantize():
    model = make_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(LorafitError, match="nn.Linear") as e:
        lf.apply_lora(model, lf.LoraConfig(init="loftq", target_modules=["q_proj", "embed_tokens"]))
    assert "\n" not in str(e.value)
    assert not list(lora_layers(model)) and all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    with pytest.raises(LorafitError, match="nn.Linear"):
        lf.apply_lora(make_gpt2(), lf.LoraConfig(init="loftq", target_modules=["c_attn"]))
    with pytest.raises(LorafitError, match="loftq_iter"):
        lf.LoraConfig(init="loftq", loftq_iter=0)
