"""Preference methods in the one Trainer: the reference, precomputed log-probs, exact accumulation and
resume, starting from an adapter, and every kind of base and adapter SFT trains."""

from __future__ import annotations

import json
import math
import os
import random

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import lorafit as lf
from lorafit.errors import AdapterError, LorafitError
from lorafit.lora.inject import lora_layers
from lorafit.quant.apply import quantize_model
from lorafit.train.data import DataConfig, load_data
from lorafit.train.objectives.logps import reference, token_logps
from lorafit.train.prepare import REFERENCE
from lorafit.train.trainer import TrainConfig, Trainer


def tiny_llama(seed: int = 0, layers: int = 2, hidden: int = 32) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=49152, hidden_size=hidden, intermediate_size=2 * hidden,
                                        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=128))


def pairs(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(1, 60), rng.randint(1, 60)
        out.append({"prompt": [{"role": "user", "content": f"What is {a} plus {b}?"}],
                    "chosen": [{"role": "assistant", "content": f"{a + b}"}],
                    "rejected": [{"role": "assistant", "content": f"{a + b + rng.randint(1, 9)}, I think"}]})
    return out


@pytest.fixture(scope="module")
def data(tokenizer, tmp_path_factory):
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in pairs(20)))
    return path, load_data(tokenizer, DataConfig(path=str(path), val_fraction=0.2))


def config(out, **kw) -> TrainConfig:
    lora = lf.LoraConfig(r=4, alpha=8, target_modules="all-linear")
    return TrainConfig(**{"output_dir": str(out), "method": "dpo", "lora": lora, "batch_size": 4, "max_steps": 3,
                          "learning_rate": 1e-3, "warmup_ratio": 0.0, **kw})


def saved_adapter(tmp_path, name: str, seed: int) -> str:
    """A LoRA adapter of the tiny Llama with random A and B (B != 0), saved in PEFT format."""
    model = lf.apply_lora(tiny_llama(), lf.LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B["default"].normal_(0, 0.3, generator=g)
    return str(lf.save_adapter(model, tmp_path / name))


def test_a_fresh_adapter_starts_at_ln2_against_the_base(tokenizer, data, tmp_path):
    _, splits = data
    trainer = Trainer(config(tmp_path), tiny_llama(), tokenizer, splits.train, splits.val)
    batch = trainer._micro_batch(0)
    with torch.no_grad():
        loss, metrics = trainer.objective.loss(trainer.model, batch)
    assert loss.item() / trainer.objective.count(batch) == pytest.approx(math.log(2), abs=1e-6)
    assert metrics["rewards/margins"][0].item() == 0.0
    base = tiny_llama()
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}
    with torch.no_grad(), reference(trainer.model, trainer.objective.reference_adapter):
        ref_logits = trainer.model(**inputs).logits
    torch.testing.assert_close(ref_logits, base(**inputs).logits, rtol=0, atol=1e-6)  # the reference is the base
    assert trainer.model.training


def test_from_an_adapter_the_reference_is_that_adapter(tokenizer, data, tmp_path):
    _, splits = data
    start = saved_adapter(tmp_path, "start", seed=1)
    trainer = Trainer(config(tmp_path / "run", adapter=start), tiny_llama(), tokenizer, splits.train)
    assert trainer.objective.reference_adapter == REFERENCE
    batch = trainer._micro_batch(0)
    with torch.no_grad():
        loss, _ = trainer.objective.loss(trainer.model, batch)
        reference_logps = trainer.objective.reference_logps(trainer.model, batch)
    assert loss.item() / trainer.objective.count(batch) == pytest.approx(math.log(2), abs=1e-6)
    alone = lf.load_adapter(tiny_llama(), start).eval()  # the start adapter by itself, on a fresh base
    with torch.no_grad():
        logp = token_logps(alone, batch, batch["completion_mask"]).logp
    expected = (logp * batch["completion_mask"]).sum(1).view(2, -1).t()
    torch.testing.assert_close(reference_logps, expected, rtol=0, atol=1e-5)
    assert all(not p.requires_grad for n, p in trainer.model.named_parameters() if f".{REFERENCE}" in n)
    other = saved_adapter(tmp_path, "other", seed=2)  # ref_adapter names another one
    trainer = Trainer(config(tmp_path / "run2", adapter=start, ref_adapter=other), tiny_llama(), tokenizer, splits.train)
    with torch.no_grad():
        loss, _ = trainer.objective.loss(trainer.model, batch)
    assert abs(loss.item() / 4 - math.log(2)) > 1e-3


def test_precomputed_and_on_the_fly_references_give_the_same_run(tokenizer, data, tmp_path):
    _, splits = data
    start = saved_adapter(tmp_path, "start", seed=1)
    runs = {}
    for precompute in (False, True):
        out = tmp_path / f"precompute={precompute}"
        runs[precompute] = Trainer(config(out, adapter=start, precompute_ref_log_probs=precompute, eval_steps=3),
                                   tiny_llama(), tokenizer, splits.train, splits.val).train()
    for a, b in zip(runs[False], runs[True]):
        for key in ("loss", "rewards/margins", "val_loss", "val_rewards/accuracies"):
            if key in a:
                assert abs(a[key] - b[key]) <= 1e-5, (key, a[key], b[key])
    cache = sorted((tmp_path / "precompute=True" / "reference").glob("*.json"))
    assert [p.name.split("-")[0] for p in cache] == ["train", "val"]
    stamps = [p.stat().st_mtime_ns for p in cache]
    again = Trainer(config(tmp_path / "precompute=True", adapter=start, precompute_ref_log_probs=True),
                    tiny_llama(), tokenizer, splits.train, splits.val)
    again._precompute_reference()  # the same data, base and reference: read back, not recomputed
    assert [p.stat().st_mtime_ns for p in cache] == stamps
    assert [s.ref_logps for s in again.train_samples] == [tuple(v) for v in json.loads(cache[0].read_text())]
    other = saved_adapter(tmp_path, "other", seed=2)  # another reference: another key, computed anew
    changed = Trainer(config(tmp_path / "precompute=True", adapter=start, ref_adapter=other,
                             precompute_ref_log_probs=True), tiny_llama(), tokenizer, splits.train, splits.val)
    changed._precompute_reference()
    assert len(list((tmp_path / "precompute=True" / "reference").glob("train-*.json"))) == 2


@pytest.mark.parametrize("method", ["dpo", "orpo", "simpo", "kto"])
def test_accumulation_is_exact(tokenizer, data, tmp_path, method):
    """2 micro-batches of 4 == 1 batch of 8: the same loss and LoRA gradients (pairs / examples normalise)."""
    path, _ = data
    samples = load_data(tokenizer, DataConfig(path=str(path)), unpair=method == "kto").train[:8]
    results = []
    for size in (8, 4):
        trainer = Trainer(config(tmp_path, method=method, batch_size=size, grad_accum=8 // size,
                                 preference={"loss_type": "apo_zero_unpaired"} if method == "kto" else {}),
                          tiny_llama(), tokenizer, samples)
        with torch.no_grad():
            for _, layer in lora_layers(trainer.model):
                layer.lora_B["default"].normal_(0, 0.2, generator=torch.Generator().manual_seed(1))
        micro = [trainer.objective.collate(trainer.train_samples[i:i + size], trainer.pad_id) for i in range(0, 8, size)]
        loss = trainer.accumulate(micro)
        grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
        results.append((loss, grads, trainer.metrics))
    (loss_a, grads_a, metrics_a), (loss_b, grads_b, metrics_b) = results
    assert abs(loss_a - loss_b) <= 1e-5
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], atol=1e-6, rtol=1e-4)
    for name in ("rewards/chosen", "logps/chosen", "logits/chosen"):
        assert metrics_a[name] == pytest.approx(metrics_b[name], abs=1e-5)


def test_resume_is_exact(tokenizer, data, tmp_path):
    _, splits = data
    full = Trainer(config(tmp_path / "full", max_steps=4, save_steps=2, save_total_limit=4, lora=lf.LoraConfig(
        r=4, alpha=8, target_modules="all-linear", dropout=0.1)), tiny_llama(), tokenizer, splits.train).train()
    resumed_dir = tmp_path / "resumed"
    (resumed_dir / "checkpoints").mkdir(parents=True)
    os.rename(tmp_path / "full" / "checkpoints" / "step-00000002", resumed_dir / "checkpoints" / "step-00000002")
    cfg = config(resumed_dir, max_steps=4, save_steps=2, lora=lf.LoraConfig(r=4, alpha=8, target_modules="all-linear",
                                                                            dropout=0.1))
    resumed = Trainer(cfg, tiny_llama(), tokenizer, splits.train).train(resume=True)
    assert [h["step"] for h in resumed] == list(range(1, 5))
    for a, b in zip(full[2:], resumed[2:]):
        assert abs(a["loss"] - b["loss"]) <= 1e-6 and a["rewards/margins"] == pytest.approx(b["rewards/margins"], abs=1e-6)
    ours = lf.io.read_adapter(resumed_dir / "adapter")[1].layers
    theirs = lf.io.read_adapter(tmp_path / "full" / "adapter")[1].layers
    for path in theirs:
        for key in theirs[path]:
            torch.testing.assert_close(ours[path][key], theirs[path][key], rtol=0, atol=1e-6)


BASES = {
    "nf4": dict(quant="nf4"), "ternary": dict(quant="ternary"), "dora": dict(use_dora=True),
    "rslora": dict(use_rslora=True), "loraplus": dict(loraplus_lr_ratio=16.0), "unfused": dict(fused_lora=False),
}


@pytest.mark.parametrize("kind,method", [(kind, "dpo") for kind in BASES] + [("nf4", "kto"), ("ternary", "kto")])
def test_every_base_and_adapter_kind_trains(tokenizer, data, tmp_path, kind, method):
    path, _ = data
    spec = dict(BASES[kind])
    model = tiny_llama(hidden=64)
    if "quant" in spec:
        model = quantize_model(model, spec.pop("quant"))
    lora = lf.LoraConfig(r=4, alpha=8, target_modules="all-linear", use_dora=spec.pop("use_dora", False),
                         use_rslora=spec.pop("use_rslora", False))
    samples = load_data(tokenizer, DataConfig(path=str(path)), unpair=method == "kto").train
    trainer = Trainer(config(tmp_path, method=method, lora=lora, max_steps=2, **spec), model, tokenizer, samples)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    history = trainer.train()
    assert all(math.isfinite(h["loss"]) for h in history)
    assert any(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters() if p.requires_grad)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


def test_sft_continues_from_an_adapter_and_a_wrong_base_is_one_line(tokenizer, tmp_path):
    from lorafit.train.demo_task import make_dataset, write_jsonl

    sft = load_data(tokenizer, DataConfig(path=str(write_jsonl(tmp_path / "d.jsonl", make_dataset(8, seed=1))))).train
    start = saved_adapter(tmp_path, "start", seed=1)
    trainer = Trainer(config(tmp_path / "sft", method="lora", adapter=start, lora=lf.LoraConfig(r=16)),
                      tiny_llama(), tokenizer, sft)
    from lorafit.lora.state import get_adapter_state

    state, saved = get_adapter_state(trainer.model, "default"), lf.io.read_adapter(start)[1]
    assert {p: e["A"].shape[0] for p, e in state.layers.items()} == {p: 4 for p in saved.layers}  # the file's rank
    for p in saved.layers:
        torch.testing.assert_close(state.layers[p]["B"], saved.layers[p]["B"])
    trainer.train()
    for kw in (dict(adapter=start), dict(ref_adapter=start)):
        model = tiny_llama(hidden=64)  # another base: the adapter's shapes do not fit
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(AdapterError) as e:
            Trainer(config(tmp_path / "x", **kw), model, tokenizer, _pairs_samples(tokenizer, tmp_path))
        assert "\n" not in str(e.value) and "different base model" in str(e.value)
        assert str(e.value).startswith("ref_adapter: " if "ref_adapter" in kw else "adapter: ")
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # untouched


def _pairs_samples(tokenizer, tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in pairs(4)))
    return load_data(tokenizer, DataConfig(path=str(path))).train


def test_the_method_must_fit_the_data(tokenizer, data, tmp_path):
    from lorafit.train.demo_task import make_dataset, write_jsonl

    _, splits = data
    sft = load_data(tokenizer, DataConfig(path=str(write_jsonl(tmp_path / "d.jsonl", make_dataset(4))))).train
    with pytest.raises(LorafitError, match=r"d.jsonl:1: method dpo trains on preference pairs .* supervised records"):
        Trainer(config(tmp_path, method="dpo"), tiny_llama(), tokenizer, sft)
    with pytest.raises(LorafitError, match=r"method lora trains on supervised records .*: use method dpo"):
        Trainer(config(tmp_path, method="lora"), tiny_llama(), tokenizer, splits.train)
    with pytest.raises(LorafitError, match="ref_adapter and precompute_ref_log_probs apply to the preference methods"):
        config(tmp_path, method="lora", precompute_ref_log_probs=True)


@pytest.mark.parametrize("method", ["dpo", "kto"])
def test_no_tensor_lands_on_an_implicit_device(tokenizer, data, tmp_path, method):
    """As for SFT (tests/train/test_trainer.py): with the default device `meta`, a step with its reference
    forward, and an evaluation, run as on the model's device."""
    from lorafit.train.evaluate import evaluate

    path, _ = data
    samples = load_data(tokenizer, DataConfig(path=str(path)), unpair=method == "kto").train
    trainer = Trainer(config(tmp_path, method=method, gradient_checkpointing=True), tiny_llama(), tokenizer, samples)
    micro = [trainer._micro_batch(0), trainer._micro_batch(1)]
    trainer.accumulate(micro)
    trainer._optimizer_step()
    with torch.device("meta"):
        loss = trainer.accumulate(micro)
        trainer._optimizer_step()
        metrics = evaluate(trainer.model, trainer.train_samples[:4], trainer.pad_id, 2, objective=trainer.objective)
    assert math.isfinite(loss) and math.isfinite(metrics["val_loss"]) and "val_rewards/chosen" in metrics
    assert all(p.device.type == "cpu" for p in trainer.model.parameters())


def test_early_stopping_on_the_validation_loss(tokenizer, data, tmp_path):
    """A learning rate far too high makes the validation DPO loss worse: training stops after `patience` evals
    (steps whose gradients overflow are skipped, not stopped at: early stopping is what ends this run)."""
    _, splits = data
    history = Trainer(config(tmp_path, learning_rate=5.0, max_steps=30, eval_steps=2, early_stopping_patience=2,
                             max_grad_norm=None, max_nonfinite_steps=30), tiny_llama(), tokenizer, splits.train, splits.val).train()
    assert len(history) < 30
    evals = [h["val_loss"] if math.isfinite(h["val_loss"]) else math.inf for h in history if "val_loss" in h]
    assert min(evals[-2:]) >= min(evals)


def test_a_bf16_model_gives_fp32_log_probs_and_losses(tokenizer, data, tmp_path):
    """Half-precision NaNs (trl#878) come from log-softmax in 16 bits: the head's logits are upcast per chunk."""
    _, splits = data
    trainer = Trainer(config(tmp_path), tiny_llama().to(torch.bfloat16), tokenizer, splits.train)
    batch = trainer._micro_batch(0)
    loss, metrics = trainer.objective.loss(trainer.model, batch)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert all(torch.isfinite(v).all() for v in metrics.values())
    assert trainer.objective.reference_logps(trainer.model, batch).dtype == torch.float32
