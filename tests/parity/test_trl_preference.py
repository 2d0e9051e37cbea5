"""Preference objectives against TRL 1.16's real trainers, fp32, on the same fixed batch and adapter.

For each DPO loss type, ORPO, SimPO (CPO form) and KTO: TRL's trainer is built on a tiny Llama with a
PEFT adapter (B != 0) and a reference adapter that differs from it; lorafit loads the same two adapter
files (the trained one, and the reference as its frozen slot) and computes its objective on the batch
of its own tokenization of the same records. The loss and every metric both log agree to 1e-5, the
LoRA gradients to 1e-4 relative. The batch lorafit builds is TRL's (token ids and masks equal), so this
also checks the tokenization on these records.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

trl = pytest.importorskip("trl")
from datasets import Dataset  # noqa: E402  (trl's own dependency)
from peft import LoraConfig as PeftLoraConfig  # noqa: E402
from peft import PeftModel, get_peft_model  # noqa: E402

from lorafit.io import load_adapter  # noqa: E402
from lorafit.train.config import DPO_LOSS_TYPES, PreferenceConfig  # noqa: E402
from lorafit.train.data import DataConfig, PairSample, load_data  # noqa: E402
from lorafit.train.objectives.kto import KTO  # noqa: E402
from lorafit.train.objectives.preference import Pairwise  # noqa: E402
from lorafit.train.prepare import REFERENCE  # noqa: E402

TOL, GRAD_TOL = 1e-5, 1e-4
PAIRS = [
    {"prompt": "Write the date 3 March 1998 as an ISO date:", "chosen": " 1998-03-03", "rejected": " 1998-3-3"},
    {"prompt": "Two plus two is", "chosen": " four.", "rejected": " five, I think."},
    {"prompt": "The capital of France is", "chosen": " Paris.", "rejected": " Lyon."},
    {"prompt": "Name a primary colour:", "chosen": " blue", "rejected": " a nice green colour"},
]
CHAT_PAIRS = [{"prompt": [{"role": "user", "content": p["prompt"]}],
               "chosen": [{"role": "assistant", "content": p["chosen"].strip()}],
               "rejected": [{"role": "assistant", "content": p["rejected"].strip()}]} for p in PAIRS]
UNPAIRED = [{"prompt": p["prompt"], "completion": p[k], "label": k == "chosen"}
            for p in PAIRS for k in ("chosen", "rejected")][:7]  # 4 desirable, 3 undesirable


def tiny_base() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(config).float()


def random_adapter(path, seed: int) -> None:
    model = get_peft_model(tiny_base(), PeftLoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                       lora_dropout=0.0))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    model.save_pretrained(path)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """(trained adapter folder, reference adapter folder): two different random PEFT adapters."""
    root = tmp_path_factory.mktemp("adapters")
    random_adapter(root / "policy", 1)
    random_adapter(root / "reference", 2)
    return root / "policy", root / "reference"


def trl_model(adapters):
    """TRL's policy: the PEFT model of the trained adapter; TRL adds the "ref" copy itself, whose weights
    the caller then replaces by the reference adapter's (`set_trl_reference`)."""
    return PeftModel.from_pretrained(tiny_base(), adapters[0], is_trainable=True)


def set_trl_reference(model, reference_dir) -> None:
    from safetensors.torch import load_file

    weights = load_file(str(reference_dir / "adapter_model.safetensors"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".ref." in name:
                p.copy_(weights[name.replace(".ref.", ".")])


def lorafit_model(adapters):
    model = tiny_base()
    load_adapter(model, adapters[1], REFERENCE, activate=False)
    load_adapter(model, adapters[0])
    return model.train()


def grads_by_module(model, adapter: str = "default") -> dict[str, torch.Tensor]:
    """{module path + A/B: gradient} of one adapter, in either library's naming."""
    out = {}
    for name, p in model.named_parameters():
        if p.grad is None or "lora_" not in name:
            continue
        path = name.replace("base_model.model.", "").replace(f".{adapter}.weight", "").replace(f".{adapter}", "")
        out[path.replace(".base_layer", "")] = p.grad.detach().clone()
    return out


def assert_grads_close(ours: dict, theirs: dict) -> None:
    assert ours.keys() == theirs.keys() and ours
    for key in ours:
        err = (ours[key] - theirs[key]).abs().max() / theirs[key].abs().max().clamp(min=1e-12)
        assert err <= GRAD_TOL, (key, err.item())


def assert_metrics_close(ours: dict, theirs: dict, names) -> None:
    for name in names:
        assert abs(ours[name] - theirs[name]) <= TOL * max(1.0, abs(theirs[name])), (name, ours[name], theirs[name])


def averaged(loss, metrics: dict, count: float) -> tuple[float, dict[str, float]]:
    """lorafit's (loss sum, {name: (sum, weight)}) as the means the trainer logs."""
    return loss.item() / count, {k: (v[0] / v[1]).item() for k, v in metrics.items() if v[1] > 0}


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def trl_args(cls, tmp_path, n, **kw):
    return cls(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=n, use_cpu=True, bf16=False,
               report_to=[], gradient_checkpointing=False, max_length=64, **kw)


# -- DPO ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dpo_setup(tok, adapters, tmp_path_factory):
    """TRL's DPOTrainer on the plain-text pairs (built once; each test sets its loss type), and
    lorafit's batch of the same records."""
    tmp = tmp_path_factory.mktemp("dpo")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = trl.DPOTrainer(model=trl_model(adapters), args=trl_args(trl.DPOConfig, tmp, len(PAIRS)),
                                 train_dataset=Dataset.from_list(PAIRS), processing_class=tok)
    set_trl_reference(trainer.model, adapters[1])
    theirs = trainer.data_collator([trainer.train_dataset[i] for i in range(len(PAIRS))])
    splits = load_data(tok, DataConfig(path=write_jsonl(tmp / "pairs.jsonl", PAIRS), max_seq_length=64))
    return trainer, theirs, splits.train


@pytest.mark.parametrize("loss_type", [[t] for t in DPO_LOSS_TYPES] + [["sigmoid", "bco_pair", "sft"]],
                         ids=lambda t: "+".join(t))
def test_dpo_loss_metrics_and_gradients_equal_trl(loss_type, dpo_setup, adapters, tok):
    trainer, theirs, samples = dpo_setup
    smoothing = {"exo_pair": 1e-3, "robust": 0.1}.get(loss_type[0], 0.0)
    weights = [0.8, 0.2, 1.0] if len(loss_type) > 1 else None
    trainer.loss_types, trainer.loss_weights = loss_type, weights or [1.0]
    trainer.label_smoothing = smoothing
    trainer.model.zero_grad()
    trainer._metrics["train"].clear()
    trainer.model.train()
    trl_loss = trainer.compute_loss(trainer.model, theirs)
    trl_loss.backward()
    trl_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    config = PreferenceConfig(loss_type=loss_type, loss_weights=weights, label_smoothing=smoothing)
    config.check("dpo")
    objective = Pairwise("dpo", config, REFERENCE)
    model = lorafit_model(adapters)
    batch = objective.collate(samples, tok.pad_token_id)
    for key in ("input_ids", "attention_mask", "completion_mask"):  # the same batch: tokenization as TRL's
        assert torch.equal(batch[key], theirs[key]), key
    loss, metrics = objective.loss(model, batch)
    (loss / objective.count(batch)).backward()  # the trainer's normalisation: the mean over the pairs
    ours_loss, ours = averaged(loss, metrics, objective.count(batch))
    assert abs(ours_loss - trl_loss.item()) <= TOL * max(1.0, abs(trl_loss.item())), (ours_loss, trl_loss.item())
    assert set(objective.metrics) <= set(trl_metrics)
    assert_metrics_close(ours, trl_metrics, objective.metrics)
    assert_grads_close(grads_by_module(model), grads_by_module(trainer.model))


def test_conversational_pairs_batch_equals_trl(tok, adapters, tmp_path):
    """Chat-message pairs (and an implicit-prompt file) are tokenized into TRL's very batch."""
    implicit = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in CHAT_PAIRS]
    for records in (CHAT_PAIRS, implicit):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer = trl.DPOTrainer(model=trl_model(adapters), args=trl_args(trl.DPOConfig, tmp_path, 4),
                                     train_dataset=Dataset.from_list(records), processing_class=tok)
        theirs = trainer.data_collator([trainer.train_dataset[i] for i in range(len(records))])
        samples = load_data(tok, DataConfig(path=write_jsonl(tmp_path / "c.jsonl", records), max_seq_length=64)).train
        ours = Pairwise("dpo", PreferenceConfig()).collate(samples, tok.pad_token_id)
        for key in ("input_ids", "attention_mask", "completion_mask"):
            assert torch.equal(ours[key], theirs[key]), key


# -- ORPO and SimPO (TRL's experimental ORPOTrainer and CPOTrainer) -------------------------------------
def from_trl_rows(trainer, n: int, train_on_prompt: bool) -> list[PairSample]:
    """lorafit samples holding exactly the ids TRL's older trainers tokenized (they add BOS differently)."""
    samples = []
    for i in range(n):
        row = trainer.train_dataset[i]
        prompt = row["prompt_input_ids"]
        chosen, rejected = row["chosen_input_ids"], row["rejected_input_ids"]
        assert chosen[:len(prompt)] == prompt and rejected[:len(prompt)] == prompt
        samples.append(PairSample(prompt, chosen[len(prompt):], rejected[len(prompt):], f"row {i}",
                                  train_on_prompt=train_on_prompt))
    return samples


def full_logits_mean(model, batch, rows: slice) -> float:
    """The mean logit over the completion tokens of `rows` (lorafit's logits/* definition), from full logits."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[rows, :-1]
    mask = batch["completion_mask"][rows, 1:].bool()
    return logits.float().mean(-1)[mask].mean().item()


@pytest.mark.parametrize("method,kw", [("orpo", {}), ("simpo", {"cpo_alpha": 1.0}), ("simpo", {"cpo_alpha": 0.0}),
                                       ("simpo", {"cpo_alpha": 0.5, "label_smoothing": 0.1})])
def test_orpo_and_simpo_equal_trl(method, kw, tok, adapters, tmp_path):
    from trl.experimental.cpo import CPOConfig, CPOTrainer
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if method == "orpo":
            args = trl_args(ORPOConfig, tmp_path, len(PAIRS), beta=0.1)
            trainer = ORPOTrainer(model=trl_model(adapters), args=args, train_dataset=Dataset.from_list(PAIRS),
                                  processing_class=tok)
        else:
            args = trl_args(CPOConfig, tmp_path, len(PAIRS), loss_type="simpo", beta=2.0, simpo_gamma=0.5, **kw)
            trainer = CPOTrainer(model=trl_model(adapters), args=args, train_dataset=Dataset.from_list(PAIRS),
                                 processing_class=tok)
    theirs = trainer.data_collator([trainer.train_dataset[i] for i in range(len(PAIRS))])
    trainer.model.train()
    trl_loss, trl_metrics = trainer.get_batch_loss_metrics(trainer.model, theirs, "train")
    trl_loss.backward()

    config = PreferenceConfig(beta=args.beta, **({} if method == "orpo" else {"simpo_gamma": 0.5, **kw}))
    config.check(method)
    objective = Pairwise(method, config)
    model = lorafit_model(adapters)
    # ORPO: TRL's NLL covers the prompt too; `train_on_prompt` gives that form (lorafit's default is the completion)
    batch = objective.collate(from_trl_rows(trainer, len(PAIRS), train_on_prompt=method == "orpo"), tok.pad_token_id)
    loss, metrics = objective.loss(model, batch)
    (loss / objective.count(batch)).backward()  # the trainer's normalisation: the mean over the pairs
    ours_loss, ours = averaged(loss, metrics, objective.count(batch))
    assert abs(ours_loss - trl_loss.item()) <= TOL * max(1.0, abs(trl_loss.item())), (ours_loss, trl_loss.item())
    compared = [m for m in objective.metrics if not m.startswith("logits/") and m in ours]
    assert ("nll_loss" in ours) == (kw.get("cpo_alpha", 1.0) != 0)  # pure SimPO logs no NLL (TRL logs 0)
    assert_metrics_close(ours, trl_metrics, compared)
    assert_grads_close(grads_by_module(model), grads_by_module(trainer.model))
    # logits/*: the completion tokens' mean logit (TRL's DPOTrainer definition; its ORPO and CPO trainers
    # average over every position of the padded batch instead, which depends on the padding)
    b = len(PAIRS)
    assert abs(ours["logits/chosen"] - full_logits_mean(model, batch, slice(0, b))) <= TOL
    assert abs(ours["logits/rejected"] - full_logits_mean(model, batch, slice(b, 2 * b))) <= TOL


# -- KTO ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss_type,weights", [("kto", (1.0, 1.0)), ("kto", (1.33, 0.7)),
                                               ("apo_zero_unpaired", (1.0, 1.0))])
def test_kto_equals_trl(loss_type, weights, tok, adapters, tmp_path):
    n = len(UNPAIRED)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = trl_args(trl.KTOConfig, tmp_path, n, loss_type=loss_type, desirable_weight=weights[0],
                        undesirable_weight=weights[1])
        trainer = trl.KTOTrainer(model=trl_model(adapters), args=args, train_dataset=Dataset.from_list(UNPAIRED),
                                 processing_class=tok)
    set_trl_reference(trainer.model, adapters[1])
    theirs = trainer.data_collator([trainer.train_dataset[i] for i in range(n)])
    trainer.model.train()
    trainer._metrics["train"].clear()
    trl_loss = trainer.compute_loss(trainer.model, theirs)
    trl_loss.backward()
    trl_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    config = PreferenceConfig(loss_type=loss_type, desirable_weight=weights[0], undesirable_weight=weights[1])
    config.check("kto")
    objective = KTO(config, n, REFERENCE)
    samples = objective.prepare(load_data(tok, DataConfig(path=write_jsonl(tmp_path / "u.jsonl", UNPAIRED),
                                                          max_seq_length=64)).train)
    batch = objective.collate(samples, tok.pad_token_id)
    width = theirs["input_ids"].shape[1]
    assert torch.equal(batch["input_ids"][:n, :width], theirs["input_ids"])
    if loss_type == "kto":
        kl_width = theirs["KL_input_ids"].shape[1]
        assert torch.equal(batch["input_ids"][n:, :kl_width], theirs["KL_input_ids"])
    model = lorafit_model(adapters)
    loss, metrics = objective.loss(model, batch)
    (loss / objective.count(batch)).backward()  # the trainer's normalisation: the mean over the pairs
    ours_loss, ours = averaged(loss, metrics, objective.count(batch))
    ours = objective.finish(ours, eval=False)
    assert abs(ours_loss - trl_loss.item()) <= TOL * max(1.0, abs(trl_loss.item())), (ours_loss, trl_loss.item())
    assert_metrics_close(ours, trl_metrics, [m for m in objective.metrics if m in trl_metrics])
    assert {"kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "entropy"} <= set(trl_metrics)
    assert_grads_close(grads_by_module(model), grads_by_module(trainer.model))
