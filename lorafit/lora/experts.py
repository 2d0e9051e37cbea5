"""LoRA on the 3-D expert weights of Mixture-of-Experts layers (`LoraConfig.target_parameters`).

transformers keeps an MoE layer's experts as stacked parameters of one module, e.g. Mixtral's and
Qwen2/3-MoE's `experts.gate_up_proj` (E, 2·ffn, hidden) and `experts.down_proj` (E, hidden, ffn),
each expert applied as `F.linear(x, W[e])`, i.e. stored (E, out, in). GPT-OSS-style modules store
(E, in, out) and say so with `is_transposed = True`. Each expert e gets its own low-rank pair:

    W_e' = W_e + s · B_e A_e,     A: (E, r, in),  B: (E, out, r),  s = alpha / r (alpha / sqrt(r) rsLoRA)

The forward calls the experts module with its adapted parameters swapped in
(`torch.func.functional_call`), so routing, activation and the module's own kernels are untouched;
it materialises one (E, out, in) tensor per adapted parameter per call, as PEFT's ParamWrapper does.
The router is a separate module (`mlp.gate`) and stays frozen unless listed in modules_to_save.
No dropout, DoRA or PiSSA on experts (dropout cannot act on a weight-space update; PEFT refuses them too).

PEFT (ParamWrapper, peft >= 0.17) flattens the pair as lora_A (r·E, in), row e·r + j = A[e, j], and
lora_B (out, r·E), column j·E + e = B[e, :, j]; `to_peft_layout` / `from_peft_layout` convert.
Reference: Hu et al. 2021 (LoRA); the per-expert layout follows PEFT's `target_parameters`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lorafit.config import lora_scaling
from lorafit.errors import LorafitError
from lorafit.lora.base import adapter_placement


def expert_targets(model: nn.Module, target_parameters: list[str]) -> dict[str, list[str]]:
    """Module path -> names of its 3-D parameters to adapt (registration order), by PEFT's rule: the
    key `module_path.param` equals an entry or ends with '.' + entry. One line, nothing changed,
    when an entry matches no 3-D parameter."""
    found: dict[str, list[str]] = {}
    hits = dict.fromkeys(target_parameters, 0)
    for path, module in model.named_modules():
        if ".base_layer" in path:
            continue
        owner = module.base_layer if isinstance(module, ExpertLoraLayer) else module
        for name, param in owner.named_parameters(recurse=False):
            key = f"{path}.{name}" if path else name
            entries = [t for t in target_parameters if key == t or key.endswith("." + t)]
            if not entries:
                continue
            if param.dim() != 3:
                raise LorafitError(f"target_parameters {entries[0]!r} matched {key} of shape {tuple(param.shape)}; "
                                   "only 3-D expert weights (experts, out, in) can be targeted")
            for t in entries:
                hits[t] += 1
            found.setdefault(path, []).append(name)
    missing = [t for t, n in hits.items() if n == 0]
    if missing:
        three_d = [f"{p}.{n}" for p, m in model.named_modules() for n, q in m.named_parameters(recurse=False)
                   if q.dim() == 3 and ".base_layer" not in p]
        raise LorafitError(f"target_parameters {missing[0]!r} matched no 3-D parameter of {type(model).__name__}; "
                           f"its 3-D parameters are: {', '.join(three_d[:6]) or 'none (not an MoE model)'}")
    return found


class ExpertLoraLayer(nn.Module):
    """A frozen experts module with per-expert LoRA pairs on some of its 3-D parameters."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.transposed = bool(getattr(base_layer, "is_transposed", False))  # stored (E, in, out)
        self.params: list[str] = []  # adapted parameter names, in the module's registration order
        self.lora_A = nn.ModuleDict()  # param -> ParameterDict(name -> (E, r, in))
        self.lora_B = nn.ModuleDict()  # param -> ParameterDict(name -> (E, out, r))
        self.scaling: dict[str, float] = {}
        self.active: list[str] = []
        self.merged: dict[str, None] = {}
        self.disabled = False

    def dims(self, param: str) -> tuple[int, int, int]:
        """(experts, in, out) of a 3-D parameter of the base."""
        E, d1, d2 = getattr(self.base_layer, param).shape
        return (E, d1, d2) if self.transposed else (E, d2, d1)

    def add(self, name: str, params: list[str], r: int, alpha: float, *, use_rslora: bool = False,
            init: str = "kaiming") -> None:
        if init == "pissa":
            raise LorafitError("init='pissa' is not supported on expert parameters (target_parameters)")
        order = [n for n, _ in self.base_layer.named_parameters(recurse=False)]
        self.params = [n for n in order if n in set(self.params) | set(params)]
        device, dtype = adapter_placement(self.base_layer)
        for param in params:
            E, n_in, n_out = self.dims(param)
            A = torch.zeros(E, r, n_in, device=device, dtype=dtype)
            B = torch.zeros(E, n_out, r, device=device, dtype=dtype)
            if init == "kaiming":  # PEFT: kaiming-uniform(a=sqrt(5)) over (r·E, in): bound 1/sqrt(in)
                A.uniform_(-1.0 / math.sqrt(n_in), 1.0 / math.sqrt(n_in))
            elif init == "gaussian":
                A.normal_(std=1.0 / r)
            elif init == "random":
                A.normal_(std=0.02)
                B.normal_(std=0.02)
            if param not in self.lora_A:
                self.lora_A[param], self.lora_B[param] = nn.ParameterDict(), nn.ParameterDict()
            self.lora_A[param][name] = nn.Parameter(A)
            self.lora_B[param][name] = nn.Parameter(B)
        self.scaling[name] = lora_scaling(alpha, r, use_rslora)

    def remove(self, name: str) -> None:
        if name in self.merged:
            self.unmerge([name])
        for param in list(self.lora_A):
            if name in self.lora_A[param]:
                del self.lora_A[param][name]
                del self.lora_B[param][name]
        self.scaling.pop(name, None)
        self.active = [a for a in self.active if a != name]

    def adapter_names(self) -> list[str]:
        return list(self.scaling)

    def adapter_params(self, name: str) -> list[nn.Parameter]:
        return [d[name] for store in (self.lora_A, self.lora_B) for d in store.values() if name in d]

    def delta(self, param: str, name: str) -> torch.Tensor:
        """s · B_e A_e for every expert, in the parameter's own layout: (E, out, in) or (E, in, out)."""
        dW = self.scaling[name] * torch.bmm(self.lora_B[param][name], self.lora_A[param][name])  # (E, out, in)
        return dW.transpose(1, 2) if self.transposed else dW

    def forward(self, *args, **kwargs):
        names = [n for n in self.active if n in self.scaling and n not in self.merged]
        if self.disabled or not names:
            return self.base_layer(*args, **kwargs)
        swapped = {}
        for param in self.params:
            W = getattr(self.base_layer, param)
            for n in names:
                if n in self.lora_A[param]:
                    W = W + self.delta(param, n).to(W.dtype)
            swapped[param] = W
        return torch.func.functional_call(self.base_layer, swapped, args, kwargs, strict=False)

    @torch.no_grad()
    def merge(self, names: list[str] | None = None) -> None:
        for name in names if names is not None else self.active:
            if name in self.merged or name not in self.scaling:
                continue
            for param in self.params:
                if name in self.lora_A[param]:
                    W = getattr(self.base_layer, param)
                    W.copy_((W.float() + self.delta(param, name).float()).to(W.dtype))
            self.merged[name] = None

    @torch.no_grad()
    def unmerge(self, names: list[str] | None = None) -> None:
        for name in reversed(list(self.merged)):
            if names is not None and name not in names:
                continue
            del self.merged[name]
            for param in self.params:
                if name in self.lora_A[param]:
                    W = getattr(self.base_layer, param)
                    W.copy_((W.float() - self.delta(param, name).float()).to(W.dtype))

    def extra_repr(self) -> str:
        return f"params={self.params}, transposed={self.transposed}, adapters={self.adapter_names()}"


def to_peft_layout(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(E, r, in), (E, out, r) -> PEFT's flattened (r·E, in), (out, r·E) (see the module docstring)."""
    E, r, n_in = A.shape
    return A.reshape(E * r, n_in), B.permute(1, 2, 0).reshape(B.shape[1], r * E)


def from_peft_layout(A: torch.Tensor, B: torch.Tensor, experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's (r·E, in), (out, r·E) -> (E, r, in), (E, out, r)."""
    r = A.shape[0] // experts
    return A.reshape(experts, r, A.shape[1]), B.reshape(B.shape[0], r, experts).permute(2, 0, 1)
