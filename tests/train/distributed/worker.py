"""One process of a distributed test run: `worker.py DATA OUT PHASE [PHASE ...]`, started by torchrun
or as bare processes (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set by the test).

Each phase trains with the real Trainer under the real process group and records what the tests
compare in OUT/rank<r>.json (rewritten after every phase):

    ddp      distributed: ddp, 5 steps of 2 micro-batches (into the 2nd epoch), a checkpoint every 2,
             validation at the end: losses, validation loss
    fsdp     distributed: fsdp on an NF4 base, 5 steps, validation at the end: losses, validation
             loss, and the frozen bytes this rank holds, before (whole) and after sharding
    dpo      method dpo, ddp, 5 steps of 2 micro-batches, reference log-probs precomputed: losses, margins,
             validation loss and reward accuracy
    kto      method kto, fsdp on an NF4 base, from a start adapter (the reference slot): losses, KL estimates,
             validation loss
    grpo     method grpo, ddp, 3 steps of 2 micro-batches of 8 completion slots (each rank samples its share),
             validation at the end: losses, rewards, entropies, validation reward
    ternary  distributed: fsdp on a ternary base, 3 steps: losses, and the ternary storage this rank
             holds, before (whole) and after sharding
    resume   fsdp + NF4 with LoRA dropout: 6 steps checkpointing at 3, then a second run resumed from
             that checkpoint: both runs' losses
    refuse   the startup errors of a batch the ranks cannot share, and of AdaLoRA (one process only)
    long=T   fsdp + NF4, a checkpoint every step, collective timeout T seconds, until killed
    raise    ddp; rank 1 raises in its second optimizer step (the failure test; last phase)
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from pathlib import Path

import lorafit as lf
from lorafit.errors import LorafitError
from lorafit.lora.inject import adapter_configs
from lorafit.quant.linear import PackedLinear
from lorafit.train.distributed.world import init_world, shutdown_world
from lorafit.train.distributed.wrap import local_bytes
from lorafit.train.trainer import Trainer
from tests.train.distributed import kit


def packed_bytes(model) -> int:
    """Bytes of the quantized linears' storage (NF4 or ternary) this rank holds."""
    return sum(local_bytes(m) for m in model.modules() if isinstance(m, PackedLinear))


def main(data: str, out: str, phases: list[str]) -> None:
    timeouts = [float(p[5:]) for p in phases if p.startswith("long=")]
    world = init_world("cpu", timeouts[0] if timeouts else 600.0)  # as `lorafit train` starts it: gloo
    rank = world.rank
    out_dir = Path(out)
    tok = kit.tokenizer()
    splits = kit.samples(tok, Path(data))
    results: dict = {"world_size": world.size}

    def record(**values) -> None:
        results.update(values)
        (out_dir / f"rank{rank}.json").write_text(json.dumps(results))

    for phase in phases:
        if phase == "ddp":
            cfg = kit.config(out_dir / "ddp", distributed="ddp", save_steps=2, save_total_limit=5, eval_steps=5,
                             grad_accum=2)
            history = Trainer(cfg, kit.tiny_llama(), tok, splits.train, splits.val).train()
            record(ddp=[h["loss"] for h in history], ddp_val=history[-1]["val_loss"])
        elif phase == "fsdp":
            model = kit.tiny_llama(quant="nf4")
            whole = local_bytes(model, trainable=True) + local_bytes(model)  # all of it is the base, for now
            whole_nf4 = packed_bytes(model)
            trainer = Trainer(kit.config(out_dir / "fsdp", distributed="fsdp", eval_steps=5), model, tok,
                              splits.train, splits.val)
            history = trainer.train()
            record(fsdp=[h["loss"] for h in history], fsdp_val=history[-1]["val_loss"],
                   frozen_whole=whole, frozen_rank=local_bytes(model), nf4_whole=whole_nf4, nf4_rank=packed_bytes(model),
                   adapter_whole=sum(p.numel() for p in trainer.params),
                   adapter_rank=sum(p.to_local().numel() for p in trainer.params))
        elif phase == "dpo":  # DDP, the base as reference, its log-probs precomputed through the wrapper
            pairs = kit.pair_samples(tok, Path(data))
            cfg = kit.config(out_dir / "dpo", method="dpo", distributed="ddp", grad_accum=2, eval_steps=5,
                             precompute_ref_log_probs=True)
            history = Trainer(cfg, kit.tiny_llama(), tok, pairs.train, pairs.val).train()
            record(dpo=[h["loss"] for h in history], dpo_margins=[h["rewards/margins"] for h in history],
                   dpo_val=history[-1]["val_loss"], dpo_val_accuracy=history[-1]["val_rewards/accuracies"])
        elif phase == "kto":  # FSDP on an NF4 base, from an adapter (the reference slot), the KL over both ranks
            unpaired = kit.pair_samples(tok, Path(data), unpair=True)
            cfg = kit.config(out_dir / "kto", method="kto", distributed="fsdp", adapter=str(kit.adapter_path(data)),
                             eval_steps=5)
            history = Trainer(cfg, kit.tiny_llama(quant="nf4"), tok, unpaired.train, unpaired.val).train()
            record(kto=[h["loss"] for h in history], kto_kl=[h["kl"] for h in history], kto_val=history[-1]["val_loss"])
        elif phase == "grpo":  # DDP; the completion slots shared among the ranks, rewards gathered before grouping
            prompts = kit.prompt_samples(tok, Path(data))
            history = Trainer(kit.grpo_config(out_dir / "grpo", distributed="ddp", eval_steps=3), kit.tiny_llama(), tok, prompts.train,
                              prompts.val).train()
            record(grpo=[h["loss"] for h in history], grpo_reward=[h["reward"] for h in history],
                   grpo_entropy=[h["entropy"] for h in history], grpo_val=history[-1]["val_reward"])
        elif phase == "ternary":
            model = kit.tiny_llama(quant="ternary")
            whole = packed_bytes(model)
            history = Trainer(kit.config(out_dir / "ternary", distributed="fsdp", max_steps=3), model, tok,
                              splits.train).train()
            record(ternary=[h["loss"] for h in history], ternary_whole=whole, ternary_rank=packed_bytes(model))
        elif phase == "resume":
            cfg = {"distributed": "fsdp", "dropout": 0.1, "max_steps": 6}
            full = Trainer(kit.config(out_dir / "r-full", save_steps=3, save_total_limit=5, **cfg),
                           kit.tiny_llama(quant="nf4"), tok, splits.train).train()
            if rank == 0:  # a run that died right after its step-3 checkpoint
                shutil.copytree(out_dir / "r-full" / "checkpoints" / "step-00000003",
                                out_dir / "r-resumed" / "checkpoints" / "step-00000003")
            world.barrier()
            resumed = Trainer(kit.config(out_dir / "r-resumed", **cfg), kit.tiny_llama(quant="nf4"), tok,
                              splits.train).train(resume=True)
            record(resume_full=[h["loss"] for h in full], resume_resumed=[h["loss"] for h in resumed])
        elif phase == "refuse":
            messages = []
            for batch_size in (3, 1):
                try:
                    Trainer(kit.config(out_dir / "refused", batch_size=batch_size), kit.tiny_llama(), tok, splits.train)
                except LorafitError as e:
                    messages.append(str(e))
            model = kit.tiny_llama()
            adalora = dataclasses.replace(kit.config(out_dir / "refused"), lora=lf.AdaLoraConfig(init_r=4, target_r=2))
            try:
                Trainer(adalora, model, tok, splits.train)
            except LorafitError as e:
                messages.append(str(e))
            record(refused=messages, refused_untouched=adapter_configs(model) == {})  # validated before any change
        elif phase.startswith("long="):  # long=SECONDS: the collective timeout
            Trainer(kit.config(out_dir / "long", distributed="fsdp", max_steps=100000, save_steps=1,
                               collective_timeout=float(phase[5:])), kit.tiny_llama(quant="nf4"), tok, splits.train).train()
        elif phase == "raise":
            trainer = Trainer(kit.config(out_dir / "raise", distributed="ddp", max_steps=50), kit.tiny_llama(), tok,
                              splits.train)
            def failing_step(trainer=trainer, step=trainer._optimizer_step):
                if rank == 1 and trainer.step == 1:
                    raise RuntimeError("rank 1 fails on purpose in its second step")
                return step()

            trainer._optimizer_step = failing_step
            trainer.train()
    shutdown_world()


if __name__ == "__main__":
    from torch.distributed.elastic.multiprocessing.errors import record as record_errors

    record_errors(main)(sys.argv[1], sys.argv[2], sys.argv[3:])
