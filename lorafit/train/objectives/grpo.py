"""GRPO (method grpo): reinforcement learning of the adapter from prompts and reward functions.

Each generation batch (batch_size * steps_per_generation completion slots: its prompts, G each):

    1. rollouts      G completions per prompt, sampled by the serving engine on this very model
                     (lorafit.train.objectives.rollout: live adapter tensors, one prefill per prompt)
    2. rewards       every reward function on this process's completions (lorafit.train.rewards),
                     gathered over the processes, then grouped (lorafit.train.objectives.grpo_loss)
    3. advantages    A_i, group-relative, over the whole generation batch
    4. micro-batches steps_per_generation of them, reused for num_iterations passes (TRL's buffer);
                     pi_old's log-probs are computed once when a pass may follow an optimizer step
                     (grad_accum not a multiple of steps_per_generation * num_iterations, TRL's rule),
                     the reference's when beta > 0

and each micro-batch's loss is `grpo_loss.aggregate` of the clipped per-token loss. The loop divides the
summed losses by the summed counts; here one micro-batch counts 1 (on the first process) and its loss is
already divided by its loss type's denominator, so a step's loss is TRL's for every loss type, on any
number of processes (bnpo counts the micro-batch's tokens over every process, where TRL counts the local
ones).

Batch rows are [prompt left-padded | completion right-padded], positions counted from each row's first
token as the engine counts them; the G copies of a prompt in a micro-batch run its tokens through the
decoder once (`logps.shared_prompt_hidden`), in training as in the engine's prefill. Metrics (TRL's names): reward, reward_std, rewards/{f}/mean, /std,
frac_reward_zero_std, completions/mean_length, min_length, max_length, clipped_ratio,
mean_terminated_length, kl (beta > 0), entropy, clip_ratio/low_mean, low_min, high_mean, high_max,
region_mean, sampling/sampling_logp_difference/mean and /max (|engine log-prob - trainer log-prob| over
the tokens trained right after they were sampled, the same weights on both sides), and time/generation,
time/scoring (seconds per generation batch; the loop's step_time holds the rest).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from torch import nn

from lorafit.device import model_device, to_device
from lorafit.errors import LorafitError
from lorafit.train.data import PromptSample
from lorafit.train.distributed.share import rank_share
from lorafit.train.objectives import metric
from lorafit.train.objectives.grpo_loss import aggregate, clip_stats, group_advantages, nanstd, policy_loss
from lorafit.train.objectives.logps import reference, token_logps
from lorafit.train.objectives.rollout import Rollouts
from lorafit.train.rewards import load_rewards

GOLDEN = 0x9E3779B97F4A7C15  # spreads slot numbers over seeds
SAMPLES_SHOWN = 8  # completions written to samples.jsonl at each evaluation


class GRPO:
    """The objective of method grpo (see the module docstring)."""

    name = "grpo"
    progress = ("reward", "reward")

    def __init__(self, config, tokenizer, reference_adapter: str | None = None, world=None, rollouts=None) -> None:
        self.train_config, self.config = config, config.grpo
        self.tokenizer, self.reference_adapter, self.world = tokenizer, reference_adapter, world
        self.rewards = load_rewards(self.config.reward_funcs)
        self.weights = torch.tensor(self.config.reward_weights or [1.0] * len(self.rewards), dtype=torch.float32)
        self.group, self.iterations = self.config.num_generations, self.config.num_iterations
        self.spg = self.config.steps_per_generation or config.grad_accum
        self.rollouts = rollouts  # made on first use, on the model the loop trains
        self.gen_names = ["reward", "reward_std", *(f"rewards/{r.name}/{s}" for r in self.rewards for s in ("mean", "std")),
                          "frac_reward_zero_std", "completions/mean_length", "completions/min_length",
                          "completions/max_length", "completions/clipped_ratio", "completions/mean_terminated_length",
                          "time/generation", "time/scoring"]
        self.metrics = tuple(self.gen_names) + (("kl",) if self.config.beta else ()) + (
            "entropy", "clip_ratio/low_mean", "clip_ratio/low_min", "clip_ratio/high_mean", "clip_ratio/high_max",
            "clip_ratio/region_mean", "sampling/sampling_logp_difference/mean", "sampling/sampling_logp_difference/max")
        self.rng = torch.Generator().manual_seed(config.seed)  # one seed per generation batch, the same on every rank
        self.micro_step = 0  # micro-batches trained so far
        self.buffer: list[dict[str, torch.Tensor]] | None = None  # this rank's micro-batches of the last generation

    # -- the loop's questions ----------------------------------------------------------------
    @property
    def rank(self) -> int:
        return self.world.rank if self.world is not None else 0

    @property
    def size(self) -> int:
        return self.world.size if self.world is not None else 1

    def draws(self, step: int, grad_accum: int) -> int:
        """Prompt micro-batches optimizer step `step` consumes: steps_per_generation at each generation."""
        every = self.spg * self.iterations
        first, last = step * grad_accum, (step + 1) * grad_accum  # its micro-steps [first, last)
        return self.spg * (math.ceil(last / every) - math.ceil(first / every))

    def prepare(self, samples: list[PromptSample]) -> list[PromptSample]:
        return samples

    def empty(self, sample: PromptSample) -> PromptSample:
        return sample

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["count"])

    def tokens(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["attention_mask"].sum())

    def finish(self, values: dict[str, float], eval: bool) -> dict[str, float]:
        return values

    # -- generation batches ------------------------------------------------------------------
    def batches(self, model: nn.Module, micro: list[list[PromptSample]], pad_id: int) -> list[dict[str, torch.Tensor]]:
        """The step's grad_accum micro-batches: from the buffer, generating when a generation is due
        (`micro` holds the prompts of the generations this step makes, steps_per_generation lists each)."""
        every, out, drawn = self.spg * self.iterations, [], list(micro)
        generated_at = None
        for _ in range(self.train_config.grad_accum):
            position = self.micro_step % every
            if position == 0:
                parts, drawn = drawn[:self.spg], drawn[self.spg:]
                self.buffer = self.generate(model, parts, pad_id)
                generated_at = self.micro_step
            batch = dict(self.buffer[position % self.spg])
            # first pass of a batch sampled in this very step: the weights that sampled it are the ones training
            fresh = generated_at is not None and self.micro_step - generated_at < self.spg
            batch["fresh"] = torch.tensor(float(fresh))
            if position != 0:
                batch.pop("gen_metrics", None)  # logged once per generation
            out.append(batch)
            self.micro_step += 1
        return out

    def generate(self, model: nn.Module, parts: list[list[PromptSample]], pad_id: int) -> list[dict[str, torch.Tensor]]:
        """Rollouts, rewards and advantages of one generation batch (`parts`: the global prompt lists of its
        micro-batches); this rank's micro-batches, on the host."""
        cfg, G = self.config, self.group
        t0 = time.perf_counter()
        slots = [[p for p in prompts for _ in range(G)] for prompts in parts]  # each micro-batch's global slots
        offsets = [sum(len(s) for s in slots[:m]) for m in range(len(slots))]
        n = sum(len(s) for s in slots)
        mine = [[(offsets[m] + j, s[j]) for j in rank_share(range(len(s)), self.rank, self.size)]
                for m, s in enumerate(slots)]  # this rank's (generation-batch index, prompt) per micro-batch
        flat = [item for part in mine for item in part]
        base = int(torch.randint(0, 2 ** 62, (1,), generator=self.rng))
        if self.rollouts is None:
            self.rollouts = Rollouts(model, self.tokenizer, cfg, max_batch_size=max(len(flat), 1))
        done = self.rollouts([p.prompt_ids for _, p in flat], [(base + g * GOLDEN) % 2 ** 63 for g, _ in flat])
        t1 = time.perf_counter()

        # rewards on this rank, then every rank's in one sum (rows of other ranks are zero here)
        texts = self.tokenizer.batch_decode([c.ids for c in done], skip_special_tokens=True)
        prompts = [p.prompt for _, p in flat]
        completions = [[{"role": "assistant", "content": t}] if p.conversational else t for t, (_, p) in zip(texts, flat)]
        keys = sorted({k for _, p in flat for k in p.columns})
        columns = {k: [p.columns.get(k) for _, p in flat] for k in keys}
        local = torch.tensor([r(prompts, completions, [c.ids for c in done], columns) for r in self.rewards],
                             dtype=torch.float32).reshape(len(self.rewards), -1).t()  # (n_mine, K)
        k = len(self.rewards)
        table = torch.zeros(n, k + 3, dtype=torch.float64)  # rewards, length, truncated, loss tokens
        for row, ((g, _), c) in enumerate(zip(flat, done)):
            masked = cfg.mask_truncated_completions and c.truncated
            table[g, :k] = local[row].double()
            table[g, k:] = torch.tensor([len(c.ids), float(c.truncated), 0.0 if masked else len(c.ids)])
        if self.world is not None and self.world.distributed:
            table = torch.tensor(self.world.sum(table.flatten().tolist()), dtype=torch.float64).view(n, k + 3)
        rewards, lengths, truncated, loss_tokens = table[:, :k].float(), table[:, k], table[:, k + 1], table[:, k + 2]
        adv = group_advantages(rewards, self.weights, G, cfg.scale_rewards)

        batches, start = [], 0
        for m, part in enumerate(mine):
            batches.append(self.micro_batch(part, done[start:start + len(part)], adv.advantages, m, offsets, slots,
                                            loss_tokens, pad_id))
            start += len(part)
        self.old_and_ref(model, batches)
        t2 = time.perf_counter()
        # every rank carries the rows (the loop reduces the same metric names on every rank); rank 0's count
        gen = self.generation_metrics(rewards, adv, lengths, truncated, t1 - t0, t2 - t1)
        batches[0]["gen_metrics"] = gen if self.rank == 0 else torch.zeros_like(gen)
        return batches

    def micro_batch(self, part, done, advantages, m, offsets, slots, loss_tokens, pad_id) -> dict[str, torch.Tensor]:
        """One micro-batch of this rank: host tensors (see the module docstring); a rank left without a slot
        of it runs one stand-in row that contributes exactly 0."""
        cfg = self.config
        stand_in = not part
        if stand_in:
            first = slots[m][0]
            part, done = [(-1, first)], [None]
        width_p = max(len(p.prompt_ids) for _, p in part)
        width_c = max(1 if c is None else len(c.ids) for c in done)
        b, width = len(part), width_p + width_c
        host = torch.device("cpu")
        ids = torch.full((b, width), pad_id, dtype=torch.long, device=host)
        attention = torch.zeros((b, width), dtype=torch.long, device=host)
        completion = torch.zeros((b, width), dtype=torch.long, device=host)
        sampled = torch.zeros((b, width), dtype=torch.float32, device=host)
        adv = torch.zeros(b, dtype=torch.float32, device=host)
        for i, ((g, p), c) in enumerate(zip(part, done)):
            start = width_p - len(p.prompt_ids)
            ids[i, start:width_p] = torch.tensor(p.prompt_ids)
            attention[i, start:width_p] = 1
            if c is None:  # the stand-in: one pad token, nothing scored
                continue
            end = width_p + len(c.ids)
            ids[i, width_p:end] = torch.tensor(c.ids)
            keep = not (cfg.mask_truncated_completions and c.truncated)
            attention[i, width_p:end] = int(keep)  # TRL masks truncated completions in attention too
            completion[i, width_p:end] = int(keep)
            sampled[i, width_p:end] = torch.tensor(c.logps[:len(c.ids)])
            adv[i] = advantages[g]
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        n_slots = len(slots[m])
        lo, hi = offsets[m], offsets[m] + n_slots
        norm = {"grpo": n_slots, "bnpo": float(loss_tokens[lo:hi].sum()),
                "dr_grpo": n_slots * cfg.max_completion_length,
                "dapo": float(loss_tokens.sum()) / self.spg}[cfg.loss_type]
        return {"input_ids": ids, "attention_mask": attention, "position_ids": positions, "completion_mask": completion,
                "sampled_logps": sampled, "advantages": adv, "norm": torch.tensor(max(norm, 1.0)),
                "count": torch.tensor(float(self.rank == 0)), "row_weight": torch.tensor([0.0 if stand_in else 1.0] * b),
                "prompt_width": torch.tensor(width_p)}

    @torch.no_grad()
    def old_and_ref(self, model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> None:
        """pi_old's per-token log-probs when a pass may come after an optimizer step, the reference's when
        beta > 0; each a no-grad forward in eval mode, kept in the batch (host)."""
        need_old = self.train_config.grad_accum % (self.spg * self.iterations) != 0
        if not (need_old or self.config.beta):
            return
        device, T = model_device(model), self.config.temperature
        was_training = model.training
        model.eval()
        try:
            for batch in batches:
                on = to_device({k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}, device)
                scored, width = batch["completion_mask"].to(device), int(batch["prompt_width"])
                if need_old:
                    batch["old_logps"] = token_logps(model, on, scored, temperature=T, prompt_width=width).logp.cpu()
                if self.config.beta:
                    with reference(model, self.reference_adapter):
                        batch["ref_logps"] = token_logps(model, on, scored, temperature=T,
                                                         prompt_width=width).logp.cpu()
        finally:
            model.train(was_training)

    def generation_metrics(self, rewards, adv, lengths, truncated, t_gen, t_score) -> torch.Tensor:
        """(M, 2) (value, 1) rows in `gen_names` order; NaN values get weight 0 (not logged)."""
        values = [torch.nanmean(adv.rewards), nanstd(adv.rewards)]
        for i in range(len(self.rewards)):
            values += [torch.nanmean(rewards[:, i]), nanstd(rewards[:, i])]
        terminated = lengths[truncated == 0]
        values += [adv.std_zero.float().mean(), lengths.mean(), lengths.min(), lengths.max(), truncated.mean(),
                   terminated.mean() if terminated.numel() else torch.tensor(0.0), t_gen, t_score]
        v = torch.tensor([float(x) for x in values], dtype=torch.float32)
        return torch.stack([torch.nan_to_num(v), (~torch.isnan(v)).float()], dim=1)

    # -- the loss ------------------------------------------------------------------------------
    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cfg = self.config
        mask = batch["completion_mask"].float()  # (B, T) the loss tokens
        out = token_logps(model, batch, batch["completion_mask"], stats=True, temperature=cfg.temperature,
                          prompt_width=int(batch["prompt_width"]))  # G copies of a prompt: one forward
        logp = out.logp  # (B, T)
        old = batch["old_logps"] if "old_logps" in batch else logp.detach()
        pl = policy_loss(logp, old, batch["advantages"], mask, eps_low=cfg.epsilon, eps_high=cfg.clip_high,
                         delta=cfg.delta, level=cfg.importance_sampling_level, beta=cfg.beta,
                         ref_logp=batch.get("ref_logps"), kl_correction=cfg.use_bias_correction_kl)
        loss = aggregate(pl.per_token, mask, cfg.loss_type, batch["norm"])
        tokens, rows = mask.sum(), batch["row_weight"]
        metrics = {"entropy": metric((out.entropy * mask).sum(), tokens)}
        if pl.kl is not None:
            metrics["kl"] = metric((pl.kl * mask).sum(), tokens)
        low, high, region = clip_stats(pl.ratio, batch["advantages"], cfg.epsilon, cfg.clip_high)
        for name, x in (("low", low), ("high", high), ("region", region)):
            if x.shape[1] == 1:  # sequence level: one value per completion
                metrics[f"clip_ratio/{name}_mean"] = metric((x[:, 0] * rows).sum(), rows.sum())
            else:
                metrics[f"clip_ratio/{name}_mean"] = metric((x * mask).sum(), tokens)
        per_seq = lambda x: x[:, 0] if x.shape[1] == 1 else (x * mask).sum(-1) / mask.sum(-1)  # noqa: E731
        real = (rows > 0) & ~torch.isnan(per_seq(low))
        metrics["clip_ratio/low_min"] = extreme(per_seq(low)[real], torch.amin)
        metrics["clip_ratio/high_max"] = extreme(per_seq(high)[real], torch.amax)
        if float(batch["fresh"]) > 0:  # (on every rank alike: a rank without loss tokens adds (0, 0))
            gap = (logp.detach() - batch["sampled_logps"]).abs() * mask
            metrics["sampling/sampling_logp_difference/mean"] = metric(gap.sum(), tokens)
            metrics["sampling/sampling_logp_difference/max"] = extreme(gap[mask > 0], torch.amax)
        if "gen_metrics" in batch:
            gm = batch["gen_metrics"].to(logp.device)
            metrics.update({name: gm[i] for i, name in enumerate(self.gen_names)})
        return loss, metrics

    # -- evaluation ---------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, model: nn.Module, samples: list[PromptSample], step: int, out: Path | None) -> dict[str, float]:
        """G completions of each validation prompt (fixed seeds, so evaluations compare), their rewards:
        val_reward, val_reward_std, val_rewards/{f}/mean, val_completions/mean_length; the first completions
        with their rewards appended to out/samples.jsonl (rank 0)."""
        G, k = self.group, len(self.rewards)
        slots = [p for p in samples for _ in range(G)]
        mine = list(rank_share(range(len(slots)), self.rank, self.size))
        if self.rollouts is None:
            self.rollouts = Rollouts(model, self.tokenizer, self.config, max_batch_size=max(len(mine), 1))
        base = self.train_config.seed + 0x5EED
        done = self.rollouts([slots[g].prompt_ids for g in mine], [(base + g * GOLDEN) % 2 ** 63 for g in mine])
        texts = self.tokenizer.batch_decode([c.ids for c in done], skip_special_tokens=True)
        prompts = [slots[g].prompt for g in mine]
        completions = [[{"role": "assistant", "content": t}] if slots[g].conversational else t for t, g in zip(texts, mine)]
        keys = sorted({key for g in mine for key in slots[g].columns})
        columns = {key: [slots[g].columns.get(key) for g in mine] for key in keys}
        table = torch.zeros(len(slots), k + 1, dtype=torch.float64)
        for g, c in zip(mine, done):
            table[g, k] = len(c.ids)
        for i, r in enumerate(self.rewards):
            table[mine, i] = torch.tensor(r(prompts, completions, [c.ids for c in done], columns), dtype=torch.float64)
        if self.world is not None and self.world.distributed:
            table = torch.tensor(self.world.sum(table.flatten().tolist()), dtype=torch.float64).view(len(slots), k + 1)
        adv = group_advantages(table[:, :k].float(), self.weights, G, self.config.scale_rewards)
        result = {"val_reward": float(torch.nanmean(adv.rewards)), "val_reward_std": float(nanstd(adv.rewards)),
                  **{f"val_rewards/{r.name}/mean": float(torch.nanmean(table[:, i].float())) for i, r in enumerate(self.rewards)},
                  "val_completions/mean_length": float(table[:, k].mean())}
        if out is not None and self.rank == 0:
            with (Path(out) / "samples.jsonl").open("a") as f:
                for row in range(min(SAMPLES_SHOWN, len(mine))):
                    g = mine[row]
                    f.write(json.dumps({"step": step, "prompt": prompts[row], "completion": texts[row],
                                        "rewards": {r.name: _json_number(table[g, i]) for i, r in enumerate(self.rewards)},
                                        "reward": _json_number(adv.rewards[g])}) + "\n")
        return result

    # -- checkpoints --------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The sampling RNG, the position, and (when the next step trains on it) every rank's part of the
        current generation batch: called on every rank; the parts are gathered to rank 0."""
        keep = self.micro_step % (self.spg * self.iterations) != 0
        buffers = [self.buffer if keep else None]
        if self.world is not None and self.world.distributed:
            buffers = self.world.gather(buffers[0])
        return {"rng": self.rng.get_state(), "micro_step": self.micro_step, "buffers": buffers}

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        self.rng.set_state(state["rng"])
        self.micro_step = state["micro_step"]
        buffers = state.get("buffers") or [None]
        if any(b is not None for b in buffers) and len(buffers) != self.size:
            raise LorafitError(f"this checkpoint holds rollouts shared among {len(buffers)} process(es), to be trained "
                               f"on for another step: resume it on {len(buffers)} process(es)")
        self.buffer = buffers[self.rank] if self.rank < len(buffers) else None


def extreme(values: torch.Tensor, reduce) -> torch.Tensor:
    """A min / max metric as (value, 1), or (±inf, 0) when there is nothing: the loop reduces metrics whose
    name ends in min / max by min / max over micro-batches and processes (lorafit.train.evaluate)."""
    if values.numel() == 0:
        empty = math.inf if reduce is torch.amin else -math.inf
        return torch.tensor([empty, 0.0], device=values.device)
    return metric(reduce(values), 1.0)


def _json_number(x) -> float | None:
    x = float(x)
    return None if math.isnan(x) else x
