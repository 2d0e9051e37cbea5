"""AdaLoRA's importance-based rank allocator and its budget schedule (Zhang et al. 2023, arXiv:2303.10512,
section 3.2-3.3 and Algorithm 1), with PEFT's RankAllocator as the reference for every number.

Importance of each adapter entry w after an optimizer step (paper eq. 8-10):

    I(w)  = |w · ∂L/∂w|                                     sensitivity
    Ī_t   = β1 Ī_{t-1} + (1 - β1) I_t                      smoothed sensitivity
    U_t   = β2 U_{t-1} + (1 - β2) |I_t - Ī_t|              uncertainty
    s(w)  = Ī_t · U_t

Score of triplet i of a layer: S_i = s(λ_i) + mean_j s(Q_ij) + mean_k s(P_ki). The budget b(t)
(total kept triplets over all layers) follows a cubic schedule from b0 = Σ init_r down to
bT = target_r × layers:

    t ≤ tinit:                b0 (no pruning)
    tinit < t ≤ T - tfinal:   bT + (b0 - bT)(1 - (t - tinit)/(T - tfinal - tinit))³, re-allocated every deltaT steps
    t > T - tfinal:           bT, the pattern fixed at t = T - tfinal and re-applied each step

Allocating zeroes λ_i for every triplet whose score is at or below the (b0 - b)-th smallest score
(ties pruned together, as in PEFT). The kept-triplet masks are the adapter's `rank_pattern`.
One deviation: where b(t) = b0 PEFT asks torch.kthvalue for k = 0 and fails; here nothing is pruned.
"""

from __future__ import annotations

import torch
from torch import nn

from lorafit.config import AdaLoraConfig
from lorafit.lora.adalora import SVDLayer

_PARTS = ("A", "E", "B")


class RankAllocator:
    """Allocates the rank budget of one AdaLoRA adapter of `model`; call `update_and_allocate(step)`
    after each optimizer step and before the gradients are cleared. The rank pattern it decides is
    written to `config.rank_pattern` (pass the config the model holds, so a save records it)."""

    def __init__(self, model: nn.Module, config: AdaLoraConfig, adapter: str, total_step: int) -> None:
        config.check_schedule(total_step)
        self.config, self.adapter, self.total_step = config, adapter, total_step
        self.layers = {path: m for path, m in model.named_modules() if isinstance(m, SVDLayer) and adapter in m.lora_A}
        self.init_bgt = sum(m.lora_A[adapter].shape[0] for m in self.layers.values())
        self.target_bgt = config.target_r * len(self.layers)
        self.reset_ipt()

    def reset_ipt(self) -> None:
        self.ipt: dict[tuple[str, str], torch.Tensor] = {}
        self.exp_avg_ipt: dict[tuple[str, str], torch.Tensor] = {}
        self.exp_avg_unc: dict[tuple[str, str], torch.Tensor] = {}

    def _tensors(self, layer: SVDLayer) -> dict[str, nn.Parameter]:
        return {"A": layer.lora_A[self.adapter], "E": layer.lora_E[self.adapter], "B": layer.lora_B[self.adapter]}

    def budget_schedule(self, step: int) -> tuple[int, bool]:
        """(budget, whether to allocate at this step); see the module docstring."""
        c = self.config
        if step <= c.tinit:
            return self.init_bgt, False
        if step > self.total_step - c.tfinal:
            return self.target_bgt, True
        mul = 1 - (step - c.tinit) / (self.total_step - c.tfinal - c.tinit)
        return int((self.init_bgt - self.target_bgt) * (mul**3) + self.target_bgt), step % c.deltaT == 0

    @torch.no_grad()
    def update_ipt(self) -> None:
        """Fold the current |w · grad| of every entry into the two moving averages."""
        b1, b2 = self.config.beta1, self.config.beta2
        for path, layer in self.layers.items():
            for part, p in self._tensors(layer).items():
                key = (path, part)
                if key not in self.ipt:
                    self.exp_avg_ipt[key] = torch.zeros_like(p)
                    self.exp_avg_unc[key] = torch.zeros_like(p)
                grad = p.grad if p.grad is not None else torch.zeros_like(p)
                self.ipt[key] = (p * grad).abs()
                self.exp_avg_ipt[key] = b1 * self.exp_avg_ipt[key] + (1 - b1) * self.ipt[key]
                self.exp_avg_unc[key] = b2 * self.exp_avg_unc[key] + (1 - b2) * (self.ipt[key] - self.exp_avg_ipt[key]).abs()

    def triplet_scores(self) -> dict[str, torch.Tensor]:
        """Path -> (r,) score S_i of each triplet, from the moving averages."""
        out = {}
        for path in self.layers:
            s = {part: self.exp_avg_ipt[(path, part)] * self.exp_avg_unc[(path, part)] for part in _PARTS}
            ab = torch.cat([s["A"].mean(dim=1, keepdim=True), s["B"].mean(dim=0).view(-1, 1)], dim=1)  # (r, 2)
            out[path] = s["E"].view(-1) + ab.sum(dim=1)
        return out

    @torch.no_grad()
    def mask_to_budget(self, budget: int) -> dict[str, list[bool]]:
        """Zero the λ of every triplet at or below the (b0 - budget)-th smallest score; the kept masks."""
        scores = self.triplet_scores()
        k = self.init_bgt - budget
        threshold = torch.kthvalue(torch.cat(list(scores.values())), k)[0].item() if k > 0 else -float("inf")
        pattern = {}
        for path, layer in self.layers.items():
            drop = scores[path] <= threshold  # (r,)
            layer.lora_E[self.adapter].masked_fill_(drop.view(-1, 1), 0.0)
            pattern[path] = (~drop).tolist()
        return pattern

    @torch.no_grad()
    def mask_using_rank_pattern(self, pattern: dict[str, list[bool]]) -> None:
        for path, layer in self.layers.items():
            keep = torch.tensor(pattern[path], device=layer.lora_E[self.adapter].device)
            layer.lora_E[self.adapter].masked_fill_(~keep.view(-1, 1), 0.0)

    def update_and_allocate(self, step: int) -> None:
        """One step of Algorithm 1 (PEFT's AdaLoraModel.update_and_allocate): update the importance
        before T - tfinal and allocate on schedule, fix the final pattern at T - tfinal, re-apply it after."""
        final = self.total_step - self.config.tfinal
        if step < final:
            self.update_ipt()
            budget, allocate = self.budget_schedule(step)
            if allocate:
                self.config.rank_pattern = self.mask_to_budget(budget)
        elif step == final:
            budget, _ = self.budget_schedule(step)
            self.config.rank_pattern = self.mask_to_budget(budget)
            self.reset_ipt()
        elif self.config.rank_pattern is not None:
            self.mask_using_rank_pattern(self.config.rank_pattern)
