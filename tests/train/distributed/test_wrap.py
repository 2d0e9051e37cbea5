"""DDP and FSDP2 (NF4 base sharded) in 2 real processes give what 1 process gives with the whole
batch; the adapter they save is whole and loads in PEFT; checkpoints resume on 2 ranks and on 1."""

from __future__ import annotations

import shutil

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from lorafit.quant.linear import NF4Linear
from lorafit.train.distributed.world import SINGLE
from lorafit.train.distributed.wrap import Parallel, decoder_blocks, index_keyed, local_bytes, name_keyed
from lorafit.train.loss import loss_sum
from lorafit.train.trainer import Trainer, latest_checkpoint
from tests.train.distributed import kit

TOL = 1e-5


def assert_same_adapter(a_dir, b_dir, tol=TOL):
    a, b = load_file(str(a_dir / "adapter_model.safetensors")), load_file(str(b_dir / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and a
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=tol, rtol=0, msg=key)


def test_ddp_two_ranks_of_micro_batch_2_equal_one_rank_of_4(two_ranks, one_rank):
    out, reference = one_rank["ddp"]
    for rank in two_ranks.ranks:
        assert rank["ddp"] == pytest.approx([h["loss"] for h in reference], abs=TOL)
        assert rank["ddp_val"] == pytest.approx(reference[-1]["val_loss"], abs=TOL)
    assert_same_adapter(two_ranks.out / "ddp" / "adapter", out / "adapter")


def test_fsdp_on_an_nf4_base_equals_one_rank_and_holds_half_the_base(two_ranks, one_rank):
    out, reference = one_rank["fsdp"]
    for rank in two_ranks.ranks:
        assert rank["fsdp"] == pytest.approx([h["loss"] for h in reference], abs=TOL)
        assert rank["fsdp_val"] == pytest.approx(reference[-1]["val_loss"], abs=TOL)  # evaluation shared too
        # bytes of the rank's own tensors after training: the whole base (embeddings, norms, NF4 codes and
        # statistics) and the NF4 storage alone, against the same model in one process before sharding
        assert rank["frozen_rank"] <= 0.55 * rank["frozen_whole"]
        assert rank["nf4_rank"] <= 0.55 * rank["nf4_whole"]
        assert rank["adapter_rank"] == rank["adapter_whole"] // 2  # the adapters are sharded too
    assert_same_adapter(two_ranks.out / "fsdp" / "adapter", out / "adapter")


def test_dpo_on_two_ranks_equals_one_rank(two_ranks, one_rank):
    """DDP, reference log-probs precomputed by both ranks through the wrapper, a stand-in pair on the rank
    left without one at the end of the epoch: the losses, margins and validation of one process."""
    out, reference = one_rank["dpo"]
    for rank in two_ranks.ranks:
        assert rank["dpo"] == pytest.approx([h["loss"] for h in reference], abs=TOL)
        assert rank["dpo_margins"] == pytest.approx([h["rewards/margins"] for h in reference], abs=TOL)
        assert rank["dpo_val"] == pytest.approx(reference[-1]["val_loss"], abs=TOL)
        assert rank["dpo_val_accuracy"] == pytest.approx(reference[-1]["val_rewards/accuracies"], abs=TOL)
    assert_same_adapter(two_ranks.out / "dpo" / "adapter", out / "adapter")


def test_kto_fsdp_from_an_adapter_equals_one_rank(two_ranks, one_rank):
    """FSDP on an NF4 base with the start adapter as the reference slot; the KL estimate spans both ranks."""
    out, reference = one_rank["kto"]
    for rank in two_ranks.ranks:
        assert rank["kto"] == pytest.approx([h["loss"] for h in reference], abs=TOL)
        assert rank["kto_kl"] == pytest.approx([h["kl"] for h in reference], abs=TOL)
        assert rank["kto_val"] == pytest.approx(reference[-1]["val_loss"], abs=TOL)
    assert_same_adapter(two_ranks.out / "kto" / "adapter", out / "adapter")


def test_grpo_on_two_ranks_equals_one_rank(two_ranks, one_rank):
    """Each rank samples its share of the completion slots (per-slot seeds), the rewards are gathered before
    grouping, bnpo counts the tokens of every rank: the losses, rewards, validation reward and adapter of one
    process."""
    out, reference = one_rank["grpo"]
    assert any(r > 0 for r in (h["reward_std"] for h in reference if "reward_std" in h))  # the rewards vary
    for rank in two_ranks.ranks:
        assert rank["grpo"] == pytest.approx([h["loss"] for h in reference], abs=TOL)
        assert rank["grpo_reward"] == pytest.approx([h["reward"] for h in reference], abs=TOL)
        assert rank["grpo_entropy"] == pytest.approx([h["entropy"] for h in reference], abs=1e-4)
        assert rank["grpo_val"] == pytest.approx(reference[-1]["val_reward"], abs=TOL)
    assert_same_adapter(two_ranks.out / "grpo" / "adapter", out / "adapter")


def test_fsdp_shards_a_ternary_base_too(two_ranks, one_rank):
    """The packed ternary codes and their scales are sharded by rows like NF4's storage."""
    out, reference = one_rank["ternary"]
    for rank in two_ranks.ranks:
        assert rank["ternary"] == pytest.approx([h["loss"] for h in reference], abs=TOL)
        assert rank["ternary_rank"] <= 0.55 * rank["ternary_whole"]
    assert_same_adapter(two_ranks.out / "ternary" / "adapter", out / "adapter")


def test_adapters_saved_by_two_ranks_load_in_peft_with_the_logits_of_one_rank(two_ranks, one_rank):
    ids = torch.randint(0, 49152, (2, 16), generator=torch.Generator().manual_seed(0))
    for strategy in ("ddp", "fsdp"):
        logits = []
        for folder in (two_ranks.out / strategy / "adapter", one_rank[strategy][0] / "adapter"):
            model = PeftModel.from_pretrained(kit.tiny_llama(), str(folder)).eval()
            with torch.no_grad():
                logits.append(model(input_ids=ids).logits)
        torch.testing.assert_close(logits[0], logits[1], atol=TOL, rtol=0, msg=strategy)
        with torch.no_grad():
            base = kit.tiny_llama()(input_ids=ids).logits
        assert (logits[0] - base).abs().max() > 1e-3  # the adapter is there and changes the output


def test_resume_on_the_same_number_of_ranks_is_exact(two_ranks):
    """FSDP + NF4 with LoRA dropout: each rank's RNG stream, its optimizer shard and the data position
    come back from the checkpoint of step 3."""
    for rank in two_ranks.ranks:
        full, resumed = rank["resume_full"], rank["resume_resumed"]
        assert len(full) == len(resumed) == 6
        assert resumed[3:] == pytest.approx(full[3:], abs=1e-6)
        assert resumed[:3] == full[:3]  # the history came back from the checkpoint


def test_a_checkpoint_of_two_ranks_resumes_on_one(two_ranks, one_rank, tokenizer, dist_samples, tmp_path):
    """Everything a checkpoint holds is whole and the global batches do not depend on the number of
    processes: one process continues the 2-rank DDP run from step 4 as the 1-process run went on."""
    out, reference = one_rank["ddp"]
    step4 = two_ranks.out / "ddp" / "checkpoints" / "step-00000004"
    shutil.copytree(step4, tmp_path / "checkpoints" / step4.name)
    assert latest_checkpoint(tmp_path) is not None
    history = Trainer(kit.config(tmp_path, grad_accum=2), kit.tiny_llama(), tokenizer,
                      dist_samples.train).train(resume=True)
    assert [h["loss"] for h in history] == pytest.approx([h["loss"] for h in reference], abs=TOL)
    assert_same_adapter(tmp_path / "adapter", out / "adapter")


def test_fsdp_shards_each_decoder_block(tmp_path):
    model = kit.tiny_llama()
    assert [type(b).__name__ for b in decoder_blocks(model)] == ["LlamaDecoderLayer"] * 2
    assert Parallel(model, loss_sum, SINGLE, "fsdp").strategy == "single"  # one process: nothing to wrap


def test_optimizer_states_convert_between_positions_and_names():
    """One process saves `optimizer.state_dict()` (by position), several save by parameter name: either
    loads in both."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    by_position = optimizer.state_dict()
    named = name_keyed(by_position, optimizer, model)
    assert list(named["state"]) == ["0.weight", "0.bias", "1.weight", "1.bias"]
    assert named["param_groups"][0]["params"] == ["0.weight", "0.bias", "1.weight", "1.bias"]
    assert name_keyed(named, optimizer, model) is named
    back = index_keyed(named, optimizer, model)
    assert back["param_groups"] == by_position["param_groups"] and back["state"].keys() == by_position["state"].keys()
    assert index_keyed(by_position, optimizer, model) is by_position
    optimizer.load_state_dict(back)


def test_local_bytes_count_a_ranks_own_tensors():
    model = kit.tiny_llama(quant="nf4")
    layer = next(m for m in model.modules() if isinstance(m, NF4Linear))
    before = local_bytes(layer)
    layer.storage_as_parameters()
    assert local_bytes(layer) == before  # the same bytes, now frozen Parameters (what FSDP shards)
