"""What an adapter changed, module by module: the numbers `lorafit inspect` reports.

For every adapted linear layer of a model that carries the adapter, W is the base weight (dense;
dequantized when the base is NF4 or ternary) and ΔW what the adapter adds to it when merged:
s·B·A for LoRA, and for DoRA (Liu et al. 2024) m ⊙ (W + s·B·A)/‖W + s·B·A‖_row − W, so the learned
magnitudes count too. The math is in `lorafit.inspect.spectra`.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from lorafit.config import DEFAULT_ADAPTER
from lorafit.inspect.spectra import (
    effective_rank,
    energy_rank,
    frobenius,
    intruder_dimensions,
    lowrank_singular_values,
    singular_values,
    stable_rank,
    suggest_rank_pattern,
)
from lorafit.lora.base import dense_weight
from lorafit.lora.inject import adapter_configs, lora_layers
from lorafit.lora.targets import layer_index

HIST_SAMPLE = 20_000  # entries per module kept for the histogram of W against ΔW


@dataclass
class ModuleStats:
    """One adapted module. `singular_values` are ΔW's, largest first (at most `rank` non-zero for LoRA;
    the top 64 for DoRA, whose ΔW is dense). `magnitude` (DoRA only): statistics of the learned m and
    of m / ‖W‖_row (1.0 where a magnitude kept its initial value)."""

    path: str
    layer: int | None
    module: str  # the short name: q_proj, down_proj, ...
    shape: tuple[int, int]  # (out, in)
    rank: int
    scaling: float
    delta_fro: float  # ‖ΔW‖_F
    weight_fro: float  # ‖W‖_F
    relative: float  # ‖ΔW‖_F / ‖W‖_F
    effective_rank: float
    stable_rank: float
    energy_rank: int  # fewest singular values holding `energy` of ‖ΔW‖_F²
    intruders: int | None  # of the top `intruder_k` singular vectors of W + ΔW; None when not computed
    singular_values: list[float] = field(default_factory=list)
    magnitude: dict[str, float] | None = None


@dataclass
class Analysis:
    modules: list[ModuleStats]
    energy: float
    intruder_k: int
    intruder_eps: float
    rank_pattern: dict  # {"r": R, "rank_pattern": {...}}: paste under `lora:`
    samples: dict[str, torch.Tensor]  # "W" and "dW": sampled entries for the histogram (not in the JSON)

    def to_json(self) -> dict:
        return {"energy": self.energy, "intruder_k": self.intruder_k, "intruder_eps": self.intruder_eps,
                "suggested_lora": self.rank_pattern, "modules": [asdict(m) for m in self.modules]}


def analyze_model(model: nn.Module, adapter: str = DEFAULT_ADAPTER, energy: float = 0.9, intruder_k: int = 10,
                  intruder_eps: float = 0.5, modules: str | None = None, progress=None) -> Analysis:
    """ModuleStats of every linear layer carrying `adapter` (whose path matches the regex `modules`, when
    given: `re.search`), plus the suggested rank_pattern (with `modules`, for those modules only: the
    others keep the adapter's r). `progress(n_done, n_total)` is called per
    module when given. Intruders are skipped (None) with intruder_k = 0."""
    layers = [(p, layer) for p, layer in lora_layers(model)
              if adapter in layer.lora_A and not layer.is_embedding and (modules is None or re.search(modules, p))]
    stats, spectra, w_parts, d_parts = [], {}, [], []
    gen = torch.Generator().manual_seed(0)
    for i, (path, layer) in enumerate(layers):
        W = dense_weight(layer.base_layer, torch.float32)  # (out, in), dequantized if need be
        A, B = layer.lora_A[adapter].detach(), layer.lora_B[adapter].detach()
        scale = layer.effective_scaling(adapter)
        magnitude = None
        if adapter in layer.lora_magnitude:  # DoRA: the merged weight minus the base
            merged, factor = layer.merged_weight(adapter, W)
            dW = merged - W
            s = singular_values(dW)[:64]
            m = layer.lora_magnitude[adapter].detach().float()
            ratio = m / torch.linalg.vector_norm(W, dim=1).clamp_min(1e-12)
            magnitude = {"mean": float(m.mean()), "min": float(m.min()), "max": float(m.max()),
                         "ratio_mean": float(ratio.mean()), "ratio_min": float(ratio.min()),
                         "ratio_max": float(ratio.max())}
        else:
            dW = layer.delta_weight(adapter)
            s = lowrank_singular_values(B, A, scale)
        stats.append(ModuleStats(
            path=path, layer=layer_index(path), module=path.rsplit(".", 1)[-1], shape=tuple(W.shape), rank=A.shape[0],
            scaling=scale, delta_fro=frobenius(dW), weight_fro=frobenius(W),
            relative=frobenius(dW) / max(frobenius(W), 1e-30), effective_rank=effective_rank(s),
            stable_rank=stable_rank(s), energy_rank=energy_rank(s, energy) if float(s.max()) > 0 else 0,
            intruders=intruder_dimensions(W, dW, intruder_k, intruder_eps) if intruder_k else None,
            singular_values=[float(v) for v in s], magnitude=magnitude))
        spectra[path] = s
        pick = torch.randint(0, W.numel(), (min(HIST_SAMPLE, W.numel()),), generator=gen)
        w_parts.append(W.flatten()[pick])
        d_parts.append(dW.flatten()[pick])
        if progress is not None:
            progress(i + 1, len(layers))
    samples = {"W": torch.cat(w_parts) if w_parts else torch.zeros(0),
               "dW": torch.cat(d_parts) if d_parts else torch.zeros(0)}
    keep = getattr(adapter_configs(model).get(adapter), "r", None) if modules is not None else None
    return Analysis(stats, energy, intruder_k, intruder_eps, suggest_rank_pattern(spectra, energy, keep), samples)
