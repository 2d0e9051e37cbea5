"""The training loop on a tiny Llama with the real SmolLM2 tokenizer: exact accumulation, parity
with a plain PEFT loop, exact resume, crash-safe checkpoints, early stopping."""

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import lorafit as lf
from bench.common import bnb_nf4_linears  # the PEFT + bitsandbytes peer, as the benchmarks build it
from lorafit.lora.inject import lora_layers
from lorafit.train.data import DataConfig, collate, load_data
from lorafit.train.demo_task import make_dataset, write_jsonl
from lorafit.train.state_files import load_state
from lorafit.train.trainer import (
    EpochOrder,
    TrainConfig,
    Trainer,
    evaluate,
    latest_checkpoint,
    lr_factor,
    make_optimizer,
    n_targets,
    token_loss_sum,
)

ROOT = Path(__file__).resolve().parents[2]


def tiny_llama(seed: int = 0, hidden: int = 32, **config) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=49152, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, **config)
    return LlamaForCausalLM(config)


@pytest.fixture(scope="module")
def samples(tokenizer, tmp_path_factory):
    path = write_jsonl(tmp_path_factory.mktemp("data") / "dates.jsonl", make_dataset(48, seed=3))
    return load_data(tokenizer, DataConfig(path=str(path), val_fraction=0.25, seed=0))


def _config(tmp_path, dropout: float = 0.0, **kw):
    lora = lf.LoraConfig(r=4, alpha=8, target_modules="all-linear", dropout=dropout)
    return TrainConfig(**{"output_dir": str(tmp_path), "lora": lora, "batch_size": 4, "learning_rate": 1e-3,
                          "max_steps": 20, "warmup_ratio": 0.1, **kw})


def _adapter_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_grad_accumulation_is_exact(tokenizer, samples, tmp_path):
    """4 micro-batches of 2 == one batch of 8: same loss and gradients (token-normalised)."""
    batch = samples.train[:8]
    results = []
    for micro_size in (8, 2):
        trainer = Trainer(_config(tmp_path, batch_size=micro_size, grad_accum=8 // micro_size),
                          tiny_llama(), tokenizer, samples.train)
        with torch.no_grad():  # non-zero B so every gradient is non-trivial
            for _, layer in lora_layers(trainer.model):
                layer.lora_B["default"].normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
        micro = [collate(batch[i:i + micro_size], trainer.pad_id) for i in range(0, 8, micro_size)]
        loss = trainer.accumulate(micro)
        results.append((loss, _adapter_grads(trainer.model)))
    (loss_full, grads_full), (loss_acc, grads_acc) = results
    assert abs(loss_full - loss_acc) <= 1e-5
    assert grads_full.keys() == grads_acc.keys()
    for name in grads_full:
        torch.testing.assert_close(grads_acc[name], grads_full[name], atol=1e-5, rtol=0)


def _compare_with_plain_peft_loop(ours: Trainer, base, tol: float) -> None:
    """Train `ours` for 20 steps, then run a plain loop over a PEFT model on `base` from the same
    initial adapters, with the same batches, optimizer, schedule and clipping; losses must agree."""
    init = {path: (layer.lora_A["default"].detach().clone(), layer.lora_B["default"].detach().clone())
            for path, layer in lora_layers(ours.model)}
    history = ours.train()
    peft_model = get_peft_model(base, PeftLoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    named = dict(peft_model.named_parameters())
    with torch.no_grad():
        for path, (A, B) in init.items():
            named[f"base_model.model.{path}.lora_A.default.weight"].copy_(A)
            named[f"base_model.model.{path}.lora_B.default.weight"].copy_(B)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    assert len(params) == 2 * len(init)
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, 20, 2, "cosine"))
    peft_model.train()  # for bitsandbytes also: no lossy CPU inference repacking
    for step in range(20):
        batch = ours._micro_batch(step)  # the same samples in the same order
        loss = peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          labels=batch["labels"]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        assert abs(loss.item() - history[step]["loss"]) <= tol, step


def test_losses_match_a_plain_peft_loop(tokenizer, samples, tmp_path):
    ours = Trainer(_config(tmp_path), tiny_llama(), tokenizer, samples.train)
    _compare_with_plain_peft_loop(ours, tiny_llama(), tol=1e-4)


def _resume_model(device: str) -> LlamaForCausalLM:
    # eager attention on CUDA: its backward has no atomics, so two runs of a step agree to the bit
    extra = {"attn_implementation": "eager"} if device == "cuda" else {}
    return tiny_llama(**extra).to(device)


@pytest.mark.parametrize("device,dropout", [
    ("cpu", 0.0),
    ("cpu", 0.1),  # the dropout masks come from the restored RNG state
    pytest.param("cuda", 0.1, marks=pytest.mark.gpu),  # CUDA's own generator state is saved and restored
])
def test_resume_is_exact(tokenizer, samples, tmp_path, device, dropout):
    full = Trainer(_config(tmp_path / "full", dropout, max_steps=15, save_steps=5, save_total_limit=5),
                   _resume_model(device), tokenizer, samples.train, samples.val).train()
    # a run that died right after its step-5 checkpoint: only that checkpoint survives
    resumed_dir = tmp_path / "resumed"
    (resumed_dir / "checkpoints").mkdir(parents=True)
    os.rename(tmp_path / "full" / "checkpoints" / "step-00000005", resumed_dir / "checkpoints" / "step-00000005")
    (resumed_dir / "checkpoints" / ".tmp-half-written").mkdir()  # what a kill during a save leaves
    state = load_state(resumed_dir / "checkpoints" / "step-00000005")
    if device == "cuda":
        assert len(state["cuda_rng"]) == torch.cuda.device_count()
    resumed = Trainer(_config(resumed_dir, dropout, max_steps=15, save_steps=5), _resume_model(device), tokenizer,
                      samples.train, samples.val).train(resume=True)
    assert [h["step"] for h in resumed] == list(range(1, 16))
    for a, b in zip(full[5:], resumed[5:]):
        assert abs(a["loss"] - b["loss"]) <= 1e-6, (a, b)
    lines = (resumed_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(1, 16))


def test_epoch_order_is_computed_once_per_epoch_and_reproducible():
    """Micro-batch i holds the samples the per-epoch shuffle (seed + epoch) puts there, whatever order
    positions are asked for in (resume asks for one in the middle first)."""
    order = EpochOrder(n_samples=10, batch_size=4, seed=3)
    assert order.batches_per_epoch == 3
    expected = []
    for epoch in range(3):
        perm = list(range(10))
        random.Random(3 + epoch).shuffle(perm)
        expected += [perm[0:4], perm[4:8], perm[8:10]]
    assert [order.indices(i) for i in range(9)] == expected
    assert order.epoch(1) is order.epoch(1)  # kept, not reshuffled per micro-batch
    fresh = EpochOrder(n_samples=10, batch_size=4, seed=3)
    assert [fresh.indices(i) for i in (7, 2, 8, 0)] == [expected[i] for i in (7, 2, 8, 0)]


def test_no_tensor_lands_on_an_implicit_device(tokenizer, samples, tmp_path):
    """With the default device set to `meta`, a tensor made without a device taken from the model or
    the batch would land there and fail against the model's CPU weights: a step, its optimizer update
    and an evaluation run as on the real device. (After one plain step: torch's non-fused AdamW keeps
    its step counters on the host by design.)"""
    trainer = Trainer(_config(tmp_path, dropout=0.1, gradient_checkpointing=True), tiny_llama(), tokenizer,
                      samples.train)
    micro = [trainer._micro_batch(0), trainer._micro_batch(1)]
    trainer.accumulate(micro)
    trainer._optimizer_step()
    with torch.device("meta"):
        loss = trainer.accumulate(micro)
        trainer._optimizer_step()
        metrics = evaluate(trainer.model, samples.val[:4], trainer.pad_id, 2)
    assert math.isfinite(loss) and math.isfinite(metrics["val_loss"])
    assert all(p.device.type == "cpu" for p in trainer.model.parameters())


def test_loss_is_fp32_on_both_paths_for_a_bf16_model(tokenizer, samples):
    """The chunked path (plain head) and the logits path both return an fp32 sum for a bf16 model."""
    model = tiny_llama().to(torch.bfloat16)
    lf.apply_lora(model, lf.LoraConfig(r=4, target_modules="all-linear"))
    batch = collate(samples.train[:4], tokenizer.pad_token_id)
    chunked, n = token_loss_sum(model, batch)
    model.config.final_logit_softcapping = 30.0  # not a plain head any more: the trainer takes the logits
    from_logits, n_again = token_loss_sum(model, batch)  # (Llama itself ignores the field: same numbers)
    assert chunked.dtype == from_logits.dtype == torch.float32 and n == n_again == n_targets(batch)
    assert abs(chunked.item() - from_logits.item()) <= 1e-3 * abs(from_logits.item())


def test_adamw_is_torch_adamw_and_8bit_needs_bitsandbytes(tokenizer, samples, tmp_path, monkeypatch):
    trainer = Trainer(_config(tmp_path), tiny_llama(), tokenizer, samples.train)
    assert isinstance(trainer.optimizer, torch.optim.AdamW) and not trainer.optimizer.defaults["fused"]
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if it were not installed
    with pytest.raises(lf.LorafitError, match="optimizer 'adamw8bit' needs bitsandbytes"):
        Trainer(_config(tmp_path, optimizer="adamw8bit"), tiny_llama(), tokenizer, samples.train)


@pytest.mark.gpu
def test_cuda_run_moves_batches_and_fuses_adamw(tokenizer, samples, tmp_path):
    """A bf16 model on CUDA trains from host batches with fp32 losses and fused AdamW, whose updates
    equal the plain single-tensor AdamW's (the same math; only the kernels differ)."""
    model = tiny_llama().to("cuda", torch.bfloat16)
    trainer = Trainer(_config(tmp_path, max_steps=3, eval_steps=3), model, tokenizer, samples.train, samples.val)
    assert trainer.optimizer.defaults["fused"] is True
    batch = trainer._micro_batch(0)
    assert batch["input_ids"].device.type == "cpu"
    loss, n = token_loss_sum(model, batch)
    assert loss.device.type == "cuda" and loss.dtype == torch.float32 and n == n_targets(batch)
    history = trainer.train()
    assert len(history) == 3 and all(math.isfinite(h["loss"]) for h in history) and "val_loss" in history[-1]
    params = [torch.nn.Parameter(torch.randn(64, 16, device="cuda")) for _ in range(2)]
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    fused = make_optimizer("adamw", params, 1e-2, 0.1)
    plain = torch.optim.AdamW(copies, lr=1e-2, weight_decay=0.1, foreach=False)
    for _ in range(3):
        for p, q in zip(params, copies):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        fused.step()
        plain.step()
    for p, q in zip(params, copies):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_kill_during_training_leaves_a_usable_checkpoint(tmp_path):
    """SIGKILL a real training process while it checkpoints every step; what is left resumes."""
    script = (
        "import sys; sys.path.insert(0, {!r})\n"
        "from tests.train.test_trainer import tiny_llama, _config\n"
        "from lorafit.train.data import DataConfig, load_data\n"
        "from lorafit.train.demo_task import make_dataset, write_jsonl\n"
        "from lorafit.train.trainer import Trainer\n"
        "from transformers import AutoTokenizer\n"
        "from lorafit.model import default_gguf\n"
        "g = default_gguf(); tok = AutoTokenizer.from_pretrained(g.parent, gguf_file=g.name)\n"
        "p = write_jsonl({!r}, make_dataset(48, seed=3))\n"
        "s = load_data(tok, DataConfig(path=str(p)))\n"
        "Trainer(_config({!r}, max_steps=10000, save_steps=1), tiny_llama(), tok, s.train).train()\n"
    ).format(str(ROOT), str(tmp_path / "d.jsonl"), str(tmp_path / "run"))
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and len(list((tmp_path / "run" / "checkpoints").glob("step-*"))) < 2:
            time.sleep(0.2)
        time.sleep(0.37)  # land somewhere inside the next step or save
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    checkpoint = latest_checkpoint(tmp_path / "run")
    assert checkpoint is not None
    config, state = lf.io.read_adapter(checkpoint / "adapter")  # complete and readable
    assert state.layers and load_state(checkpoint)["step"] >= 1


def test_early_stopping(tokenizer, samples, tmp_path):
    """A learning rate far too high makes validation worse: training stops after `patience` evals."""
    # at this rate the gradients overflow after a few steps: those steps are skipped (max_nonfinite_steps high
    # enough that the skips never stop the run), and early stopping ends it
    history = Trainer(_config(tmp_path, learning_rate=5.0, max_steps=40, eval_steps=2, early_stopping_patience=2,
                              max_grad_norm=None, warmup_ratio=0.0, max_nonfinite_steps=40),
                      tiny_llama(), tokenizer, samples.train, samples.val).train()
    assert len(history) < 40
    # a NaN evaluation counts as the worst, not as no evaluation
    evals = [h["val_loss"] if math.isfinite(h["val_loss"]) else math.inf for h in history if "val_loss" in h]
    assert min(evals[-2:]) >= min(evals)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file() and (tmp_path / "loss.png").is_file()


def test_eval_batch_size_changes_the_batches_not_the_validation_loss(tokenizer, samples, tmp_path):
    """Validation loss is a sum over target tokens divided by their count: cutting the samples into
    forwards of 1 or of all of them gives the same number, and the same training."""
    histories = [Trainer(_config(tmp_path / str(size), max_steps=2, eval_steps=2, eval_batch_size=size), tiny_llama(),
                         tokenizer, samples.train, samples.val).train() for size in (1, len(samples.val))]
    assert [h["loss"] for h in histories[0]] == [h["loss"] for h in histories[1]]
    assert abs(histories[0][-1]["val_loss"] - histories[1][-1]["val_loss"]) <= 1e-5


def test_gradient_checkpointing_gives_the_same_step(tokenizer, samples, tmp_path):
    batch = [collate(samples.train[:4], tokenizer.pad_token_id or 0)]
    losses = []
    for checkpointing in (False, True):
        trainer = Trainer(_config(tmp_path, gradient_checkpointing=checkpointing), tiny_llama(), tokenizer,
                          samples.train)
        losses.append((trainer.accumulate(batch), _adapter_grads(trainer.model)))
    assert abs(losses[0][0] - losses[1][0]) <= 1e-6
    for name, grad in losses[0][1].items():
        torch.testing.assert_close(losses[1][1][name], grad, atol=1e-6, rtol=0)


def test_bad_train_config_names_the_field():
    with pytest.raises(lf.LorafitError, match="TrainConfig.schedule"):
        TrainConfig(schedule="exp")
    with pytest.raises(lf.LorafitError, match="TrainConfig.batch_size"):
        TrainConfig(batch_size=0)
    with pytest.raises(lf.LorafitError, match="TrainConfig.eval_batch_size"):
        TrainConfig(eval_batch_size=0)


def test_qlora_losses_match_peft_with_bitsandbytes(tokenizer, samples, tmp_path):
    from lorafit.quant.apply import quantize_model

    # width 64: bitsandbytes' CPU dequantize is wrong for 32-wide rows (its own statistics disagree)
    ours = Trainer(_config(tmp_path), quantize_model(tiny_llama(hidden=64), "nf4"), tokenizer, samples.train)
    _compare_with_plain_peft_loop(ours, bnb_nf4_linears(tiny_llama(hidden=64), torch.float32), tol=1e-3)


def test_adalora_regularizer_in_the_loss_and_allocation_after_each_step(tokenizer, samples, tmp_path):
    """An AdaLoRA adapter trains with R in the gradients, ends at the target budget, and its file (with
    the final rank_pattern) loads in PEFT to the trained model's logits."""
    from peft import PeftModel

    from lorafit.lora.adalora import SVDLayer, orthogonality_regularizer
    from lorafit.lora.inject import adapter_configs

    ada = lf.AdaLoraConfig(init_r=4, target_r=2, tinit=1, tfinal=1, deltaT=1, target_modules=["q_proj", "v_proj"])
    config = TrainConfig(output_dir=str(tmp_path), lora=ada, batch_size=2, learning_rate=1e-2, max_steps=3,
                         warmup_ratio=0.0)
    model = tiny_llama()
    trainer = Trainer(config, model, tokenizer, samples.train)
    batch = collate(samples.train[:4], trainer.pad_id)
    trainer.accumulate([batch])
    ours = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    expected = token_loss_sum(model, batch)
    (expected[0] / expected[1] + 0.5 * orthogonality_regularizer(model, "default")).backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(ours[name], p.grad, atol=1e-6, rtol=1e-5)
    model.zero_grad()

    trainer.train()
    pattern = adapter_configs(model)["default"].rank_pattern
    layers = [m for m in model.modules() if isinstance(m, SVDLayer)]
    assert len(pattern) == len(layers) == 4 and sum(sum(m) for m in pattern.values()) == 2 * len(layers)
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "ADALORA" and saved["total_step"] == 3 and len(saved["rank_pattern"]) == 4
    ids = torch.tensor([batch["input_ids"][0].tolist()])
    peft_model = PeftModel.from_pretrained(tiny_llama(), tmp_path / "adapter").eval()
    torch.testing.assert_close(peft_model(ids).logits, model.eval()(ids).logits, atol=1e-5, rtol=0)


def test_the_loss_plot_has_whole_steps_on_its_axis():
    from lorafit.plots import pyplot
    from lorafit.train.curves import loss_figure

    fig = loss_figure([{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}, {"step": 3, "loss": 1.2, "val_loss": 1.4}])
    fig.canvas.draw()
    ticks = fig.axes[0].get_xticks()
    assert len(ticks) >= 2 and all(float(t).is_integer() for t in ticks), ticks
    pyplot().close(fig)


def _checkpoint_names(out) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").glob("step-*"))


def test_a_second_run_into_a_used_folder_is_refused_and_changes_nothing(tokenizer, samples, tmp_path):
    """Issue 29, bug 3: a second run (another rank) into a folder holding a run overwrote its adapter and
    metrics, rotation deleted the new run's checkpoint, and --resume died on a tensor-size error."""
    out = tmp_path / "run"
    first = dict(lora=lf.LoraConfig(r=16, alpha=16, target_modules="all-linear"), max_steps=8, save_steps=2)
    Trainer(_config(out, **first), tiny_llama(), tokenizer, samples.train).train()
    assert _checkpoint_names(out) == ["step-00000006", "step-00000008"]
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}

    second = dict(lora=lf.LoraConfig(r=4, alpha=16, target_modules="all-linear"), max_steps=4, save_steps=2)
    with pytest.raises(lf.LorafitError) as err:
        Trainer(_config(out, **second), tiny_llama(), tokenizer, samples.train).train()
    assert str(err.value) == (f"output_dir {out}: holds an earlier run (adapter, checkpoints, metrics.jsonl, "
                              "loss.png); --resume continues it, --overwrite replaces it, or choose another output_dir")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # nothing lost

    with pytest.raises(lf.LorafitError) as err:  # resuming it with another adapter: one line naming both
        Trainer(_config(out, **{**second, "max_steps": 10}), tiny_llama(), tokenizer, samples.train).train(resume=True)
    assert str(err.value) == (f"{out / 'checkpoints' / 'step-00000008'}: this checkpoint was written with "
                              "lora.r=16, this run has lora.r=4; resume with the settings it was trained with, or "
                              "start over with --overwrite (or another output_dir)")

    history = Trainer(_config(out, **second), tiny_llama(), tokenizer, samples.train).train(overwrite=True)
    assert _checkpoint_names(out) == ["step-00000002", "step-00000004"]  # the new run's, not 6 and 8
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["r"] == 4 and len(history) == 4
