"""(IA)³: learned rescaling vectors on a frozen base layer (Liu et al. 2022, "Few-Shot
Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context Learning", arXiv:2205.05638).

    attention-type target (keys, values):   y = l ⊙ base(x)          l: (out,)
    feed-forward target (MLP down proj.):    y = base(l ⊙ x)          l: (in,)

Vectors start at 1, so the model is unchanged at step 0; several active adapters multiply. Merging
folds l into the weight (rows W[i,:] *= l_i and the bias, or columns W[:,j] *= l_j); unmerging
divides it out again (a vector with an exact zero keeps a copy of the weight instead, since
dividing by it cannot restore the base). The base is any kind `lorafit.lora.base` knows that is a
linear map: nn.Linear, GPT-2's Conv1D ((in, out) storage read through the base kind), NF4/ternary.
PEFT's IA3Layer is the reference for the numbers; its file keys live in lorafit.io.
"""

from __future__ import annotations

import torch
from torch import nn

from lorafit.config import IA3Config
from lorafit.errors import LorafitError
from lorafit.lora.base import adapter_placement, base_dims, dense_weight, is_linear, write_weight
from lorafit.lora.targets import find_targets, name_matches

# PEFT's defaults per family: (target_modules, feedforward_modules)
_LLAMA = (["k_proj", "v_proj", "down_proj"], ["down_proj"])
DEFAULT_IA3_TARGETS: dict[str, tuple[list[str], list[str]]] = {
    "llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA, "qwen3": _LLAMA, "gemma": _LLAMA, "gemma2": _LLAMA,
    "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
}


class IA3Layer(nn.Module):
    """A frozen base layer with named (IA)³ vectors; see the module docstring for the math."""

    def __init__(self, base_layer: nn.Module, feedforward: bool) -> None:
        super().__init__()
        if not is_linear(base_layer):
            raise LorafitError(f"(IA)³ adapts linear layers (Linear, Conv1D, NF4); {type(base_layer).__name__} is not one")
        self.base_layer = base_layer
        self.in_features, self.out_features = base_dims(base_layer)
        self.feedforward = feedforward
        self.ia3_l = nn.ParameterDict()  # name -> (in,) if feedforward else (out,)
        self.active: list[str] = []
        self.merged: dict[str, tuple[torch.Tensor, torch.Tensor | None] | None] = {}  # name -> saved (W, bias) or None
        self.disabled = False

    def add(self, name: str, init_ones: bool = True) -> None:
        device, dtype = adapter_placement(self.base_layer)
        size = self.in_features if self.feedforward else self.out_features
        vec = torch.ones(size, device=device, dtype=dtype) if init_ones else torch.randn(size, device=device, dtype=dtype)
        self.ia3_l[name] = nn.Parameter(vec)

    def remove(self, name: str) -> None:
        if name in self.merged:
            self.unmerge([name])
        if name in self.ia3_l:
            del self.ia3_l[name]
        self.active = [a for a in self.active if a != name]

    def adapter_names(self) -> list[str]:
        return list(self.ia3_l.keys())

    def adapter_params(self, name: str) -> list[nn.Parameter]:
        return [self.ia3_l[name]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        names = [n for n in self.active if n in self.ia3_l and n not in self.merged]
        if self.disabled or not names:
            return self.base_layer(x)
        scale = self.ia3_l[names[0]]
        for n in names[1:]:
            scale = scale * self.ia3_l[n]
        if self.feedforward:
            return self.base_layer((x.to(scale.dtype) * scale).to(x.dtype))  # base(l ⊙ x)
        y = self.base_layer(x)
        return (y * scale).to(y.dtype)  # l ⊙ base(x), the bias scaled too

    # -- merge ------------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self, names: list[str] | None = None) -> None:
        for name in names if names is not None else self.active:
            if name in self.merged or name not in self.ia3_l:
                continue
            vec = self.ia3_l[name].detach().float()
            W = dense_weight(self.base_layer, torch.float32)  # (out, in)
            bias = getattr(self.base_layer, "bias", None)
            keep = None
            if bool((vec == 0).any()):  # cannot be divided out again: keep what merging overwrites
                keep = (W.cpu().clone(), None if bias is None else bias.detach().cpu().clone())
            write_weight(self.base_layer, W * (vec[None, :] if self.feedforward else vec[:, None]))
            if bias is not None and not self.feedforward:
                bias.data.copy_((bias.float() * vec).to(bias.dtype))
            self.merged[name] = keep

    @torch.no_grad()
    def unmerge(self, names: list[str] | None = None) -> None:
        for name in reversed(list(self.merged)):
            if names is not None and name not in names:
                continue
            keep = self.merged.pop(name)
            bias = getattr(self.base_layer, "bias", None)
            if keep is not None:
                write_weight(self.base_layer, keep[0])
                if bias is not None and keep[1] is not None:
                    bias.data.copy_(keep[1])
                continue
            vec = self.ia3_l[name].detach().float()
            W = dense_weight(self.base_layer, torch.float32)
            write_weight(self.base_layer, W / (vec[None, :] if self.feedforward else vec[:, None]))
            if bias is not None and not self.feedforward:
                bias.data.copy_((bias.float() / vec).to(bias.dtype))

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, feedforward={self.feedforward}, active={self.active}"


def ia3_targets(model: nn.Module, config: IA3Config) -> dict[str, bool]:
    """Module path -> whether it is a feed-forward target, for `config` on `model`; checks everything
    (unknown family without targets, a non-linear match) before anything changes."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    targets, feedforward = config.target_modules, config.feedforward_modules
    if targets is None:
        if model_type not in DEFAULT_IA3_TARGETS:
            raise LorafitError(f"IA3Config.target_modules: no default for model type {model_type!r}; "
                               "name the modules to rescale (and feedforward_modules)")
        targets, default_ff = DEFAULT_IA3_TARGETS[model_type]
        feedforward = default_ff if feedforward is None else feedforward
    feedforward = feedforward if feedforward is not None else DEFAULT_IA3_TARGETS.get(model_type, ([], []))[1]
    found = find_targets(model, targets, wrapper=IA3Layer)
    modules = dict(model.named_modules())
    bad = [p for p in found if not (isinstance(modules[p], IA3Layer) or is_linear(modules[p]))]
    if bad:
        raise LorafitError(f"IA3Config.target_modules matched {bad[0]} ({type(modules[bad[0]]).__name__}); (IA)³ "
                           "rescales plain Linear, Conv1D or NF4 layers only (not ones that carry LoRA adapters)")
    out = {p: bool(feedforward) and name_matches(p, feedforward) for p in found}
    clash = [p for p, ff in out.items() if isinstance(modules[p], IA3Layer) and modules[p].feedforward != ff]
    if clash:
        raise LorafitError(f"IA3Config.feedforward_modules: {clash[0]} already holds (IA)³ adapters of the other "
                           "kind (input vs output scaling); use the same feedforward_modules for all adapters")
    return out
