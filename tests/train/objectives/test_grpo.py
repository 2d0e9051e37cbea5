"""GRPO in the one Trainer, on a tiny random Llama with SmolLM2's tokenizer: the serving engine's sampled
log-probs equal the trainer's recomputation and follow each optimizer step with no sync, an NF4 base is
held once, a run interrupted after a checkpoint resumes to the same rewards and adapter.

(TRL parity of the advantages and the loss: tests/parity/test_trl_grpo.py; bad input from the CLI:
test_grpo_cli.py.)"""

from __future__ import annotations

import gc
import json
import os

import torch

import lorafit as lf
from lorafit.lora.inject import lora_layers
from lorafit.quant.apply import quantize_model
from lorafit.train.data import DataConfig, load_data
from lorafit.train.objectives.grpo import GRPO
from lorafit.train.objectives.logps import token_logps
from lorafit.train.trainer import TrainConfig, Trainer
from tests.train.objectives.test_preference_training import tiny_llama

PROMPTS = [{"prompt": f"Write {a} plus {b} as a number:", "answer": str(a + b)} for a, b in
           [(3, 4), (10, 5), (7, 7), (21, 1), (2, 9), (6, 30), (13, 8), (4, 4)]]


def grpo_config(out, **kw) -> TrainConfig:
    grpo = {"num_generations": 4, "max_completion_length": 10, "temperature": 0.7, "top_k": 200,
            "reward_funcs": [{"name": "length_target", "target": 40, "unit": "chars"}], **kw.pop("grpo", {})}
    return TrainConfig(**{"output_dir": str(out), "method": "grpo", "lora": lf.LoraConfig(r=4, alpha=8,
                          target_modules="all-linear"), "batch_size": 8, "max_steps": 2, "learning_rate": 5e-2,
                          "warmup_ratio": 0.0, "grpo": grpo, **kw})


def prompt_data(tokenizer, tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in PROMPTS))
    return load_data(tokenizer, DataConfig(path=str(path), val_fraction=0.0)).train


def adapted(seed: int = 0):
    """The tiny Llama with a LoRA adapter whose B is random (so the adapter changes what is sampled)."""
    model = lf.apply_lora(tiny_llama(seed), lf.LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B["default"].normal_(0, 0.3, generator=g)
    return model


def recomputed(model, batch, temperature) -> torch.Tensor:
    with torch.no_grad():
        return token_logps(model, batch, batch["completion_mask"], temperature=temperature).logp


def test_engine_logprobs_equal_the_trainers_and_follow_each_step(tokenizer, tmp_path):
    """fp32: every sampled token's engine log-prob equals the trainer's recomputation to 1e-5; after an
    optimizer step, the next rollout's log-probs are the updated adapter's (no merge, copy or sync call)."""
    torch.set_num_threads(1)
    model = adapted()
    cfg = grpo_config(tmp_path)
    objective = GRPO(cfg, tokenizer)
    samples = prompt_data(tokenizer, tmp_path)[:2]  # 2 prompts x 4 completions
    [first] = objective.batches(model, [samples], tokenizer.pad_token_id)
    scored = first["completion_mask"] > 0
    assert scored.sum() >= 20
    gap = (first["sampled_logps"] - recomputed(model, first, 0.7))[scored].abs().max()
    assert gap <= 1e-5, gap
    _, metrics = objective.loss(model, first)  # the logged train/serve gap is the same quantity
    assert float(metrics["sampling/sampling_logp_difference/max"][0]) <= 1e-5

    before = {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    logp = token_logps(model, first, first["completion_mask"], temperature=0.7).logp
    (-(logp * first["completion_mask"]).sum()).backward()
    optimizer.step()  # only this: the engine is not told

    [second] = objective.batches(model, [samples], tokenizer.pad_token_id)
    scored = second["completion_mask"] > 0
    gap = (second["sampled_logps"] - recomputed(model, second, 0.7))[scored].abs().max()
    assert gap <= 1e-5, gap
    updated = {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}
    model.load_state_dict(before, strict=False)  # the adapter as it was before the step
    stale = (second["sampled_logps"] - recomputed(model, second, 0.7))[scored].abs().max()
    model.load_state_dict(updated, strict=False)
    assert stale > 1e-2, stale  # the rollout did see the step


def tensor_bytes() -> int:
    """Bytes of every torch tensor alive in the process (parameters, buffers, caches), counted once per storage."""
    seen, total = set(), 0
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor) and not obj.is_meta:
                storage = obj.untyped_storage()
                if storage.data_ptr() not in seen:
                    seen.add(storage.data_ptr())
                    total += storage.nbytes()
        except Exception:  # some objects raise on isinstance / storage access; they hold no tensor of ours
            continue
    return total


def test_on_nf4_the_engine_holds_no_second_base(tokenizer, tmp_path):
    """A GRPO run on an NF4 base: the engine is the training model itself, and after the run the process holds
    no more tensor bytes than the model and the optimizer (a second base would add the base's bytes again)."""
    torch.set_num_threads(1)
    model = quantize_model(tiny_llama(hidden=64))
    base_bytes = sum(t.nbytes for t in model.state_dict().values())
    samples = prompt_data(tokenizer, tmp_path)
    gc.collect()
    before = tensor_bytes()
    trainer = Trainer(grpo_config(tmp_path / "nf4", grpo={"max_completion_length": 6}), model, tokenizer, samples)
    history = trainer.train()
    assert [h["step"] for h in history] == [1, 2] and all(h["entropy"] > 0 for h in history)
    assert trainer.objective.rollouts.engine.model is model
    gc.collect()
    grown = tensor_bytes() - before
    adapter_and_optimizer = 3 * sum(p.numel() * p.element_size() for p in trainer.params)
    # what the run added: the adapter with its optimizer state, and no copy of the base
    assert grown < adapter_and_optimizer + base_bytes // 4, (grown, adapter_and_optimizer, base_bytes)


def test_resume_is_exact(tokenizer, tmp_path):
    """Killed after the checkpoint at step 3, inside a generation batch that step 4 trains on again
    (num_iterations 2): the resumed run samples the same completions, gets the same rewards and ends on
    the same adapter as the uninterrupted one."""
    torch.set_num_threads(1)
    samples = prompt_data(tokenizer, tmp_path)

    def cfg(out):
        return grpo_config(out, max_steps=4, save_steps=3, batch_size=4, lora=lf.LoraConfig(
            r=4, alpha=8, target_modules="all-linear", dropout=0.1), grpo={"num_iterations": 2})

    full = Trainer(cfg(tmp_path / "full"), adapted(), tokenizer, samples).train()
    assert any(h["reward_std"] > 0 for h in full if "reward_std" in h)  # the rewards carry signal
    resumed_dir = tmp_path / "resumed"
    (resumed_dir / "checkpoints").mkdir(parents=True)
    os.rename(tmp_path / "full" / "checkpoints" / "step-00000003", resumed_dir / "checkpoints" / "step-00000003")
    resumed = Trainer(cfg(resumed_dir), adapted(), tokenizer, samples).train(resume=True)
    assert [h["step"] for h in resumed] == [1, 2, 3, 4]
    for a, b in zip(full, resumed):
        for key in ("loss", "reward", "entropy", "completions/mean_length"):
            if key in a:
                assert abs(a[key] - b[key]) <= 1e-6, (a["step"], key, a[key], b[key])
    ours = lf.io.read_adapter(resumed_dir / "adapter")[1].layers
    theirs = lf.io.read_adapter(tmp_path / "full" / "adapter")[1].layers
    for path in theirs:
        for key in theirs[path]:
            torch.testing.assert_close(ours[path][key], theirs[path][key], rtol=0, atol=1e-6)
