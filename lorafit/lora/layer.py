"""The LoRA layer: a frozen base module plus any number of named low-rank adapters.

                 ┌──────────── base_layer (frozen; Linear, GPT-2 Conv1D, NF4 or ternary) ───┐
    x ──┬────────┤                                                                           ├─(+)── y
        └ dropout ─ A (r, in) ─ B (out, r) ─ × scaling ─────────────────────────────────────┘

    y = base(x) + scaling * dropout(x) @ A^T @ B^T,   scaling = alpha / r  (alpha / sqrt(r) for rsLoRA)

B starts at zero, so the wrapped model is unchanged at step 0. With DoRA the adapted weight is
`m * (W + s*BA) / ||W + s*BA||_row` (the norm treated as a constant in backward, as the paper does).
Several adapters live side by side; `active` says which apply, `merged` which are folded into the
base weight. While serving, a `lorafit.lora.routing.RowRouting` attached as `routing` takes over the
adapter part of the forward so that each batch row uses its own adapter.

The base module is any kind `lorafit.lora.base` knows: nn.Linear, nn.Embedding, transformers' Conv1D,
or a quantized layer with `dequantize(dtype)` and `set_weight(W)` (lorafit.quant).

Where it is valid (one active LoRA/DoRA adapter on a frozen Linear or quantized base, no routing, a
plain dropout) the forward runs as one autograd node, `lorafit.ops.fused_lora.FusedLoraFunction`: the
same numbers as the module path, less memory kept for backward. `fused` (on by default) switches it.
On CUDA with a 16-bit input that path computes the low-rank matmuls in the input's dtype (fp32 master
weights and fp32 gradients stay), where the module path would upcast the input to fp32.

References: LoRA (Hu et al. 2021), rsLoRA (Kalajdzievski 2023), DoRA (Liu et al. 2024),
PiSSA (Meng et al. 2024), S-LoRA / Punica (Sheng et al. 2023; Chen et al. 2023).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from lorafit.config import INIT_MODES, lora_scaling
from lorafit.errors import LorafitError
from lorafit.lora.base import adapter_placement, base_dims, dense_weight, fused_weight_source, write_weight
from lorafit.lora.loftq import check_loftq_target, loftq_layer
from lorafit.ops import reference as ops
from lorafit.ops.fused_lora import fused_lora_linear

if TYPE_CHECKING:
    from lorafit.lora.routing import RowRouting

WRAPPER_PARTS = (".base_layer", ".original", ".copies.")  # module paths inside lorafit's wrappers


def inside_wrapper(path: str) -> bool:
    """Whether a module path lies inside a LoraLayer (its frozen base) or a ModulesToSave (the frozen
    original or a per-adapter copy): such modules are never targets of their own."""
    return any(part in path for part in WRAPPER_PARTS)


class LoraLayer(nn.Module):
    """A frozen base layer with named LoRA/DoRA adapters. See the module docstring for the math."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = base_dims(base_layer)
        self.is_embedding = isinstance(base_layer, nn.Embedding)
        self.lora_A = nn.ParameterDict()  # name -> (r, in)
        self.lora_B = nn.ParameterDict()  # name -> (out, r)
        self.lora_magnitude = nn.ParameterDict()  # name -> (out,), DoRA only
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}  # alpha / r (or / sqrt(r)), fixed by the config
        self.user_scale: dict[str, float] = {}  # set_adapter_scale multiplier, 1.0 by default
        self.active: list[str] = []
        self.merged: dict[str, torch.Tensor | None] = {}  # name -> DoRA factor used when merging
        self.disabled = False
        self.fused = True  # run the fused autograd Function where it applies (`fused_adapter`)
        self.routing: RowRouting | None = None  # per-row adapters while serving (lorafit.lora.routing)
        self.pissa_init: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # name -> (A0, B0)

    # -- adapters ---------------------------------------------------------------------------
    def add(self, name: str, r: int, alpha: float, *, dropout: float = 0.0, use_rslora: bool = False,
            use_dora: bool = False, init: str = "kaiming", loftq_iter: int = 1) -> None:
        """Add adapter `name` of rank r (see LoraConfig for the meaning of each argument)."""
        if init not in INIT_MODES:
            raise LorafitError(f"init={init!r} is not an adapter initialisation; use one of {', '.join(INIT_MODES)}")
        if self.is_embedding and use_dora:
            raise LorafitError("DoRA on embedding layers is not supported")
        device, dtype = adapter_placement(self.base_layer)
        A = torch.zeros(r, self.in_features, dtype=dtype, device=device)
        B = torch.zeros(self.out_features, r, dtype=dtype, device=device)
        self.scaling[name] = lora_scaling(alpha, r, use_rslora)
        self.user_scale[name] = 1.0
        if init == "kaiming":
            # PEFT's default: kaiming-uniform A (for embeddings: A zero and B normal, so the
            # lookup of a token still starts at zero); B zero keeps the model unchanged.
            if self.is_embedding:
                nn.init.normal_(B)
            else:
                nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        elif init == "gaussian":
            if self.is_embedding:
                nn.init.normal_(B)
            else:
                nn.init.normal_(A, std=1.0 / r)
        elif init == "random":
            nn.init.normal_(A, std=0.02)
            nn.init.normal_(B, std=0.02)
        elif init == "pissa":
            A, B = self._pissa_init(name, r)
        elif init == "loftq":  # the base becomes NF4 codes chosen with A and B (lorafit.lora.loftq)
            check_loftq_target(type(self.base_layer).__name__, self.base_layer)
            self.base_layer, A, B = loftq_layer(self.base_layer, r, self.scaling[name], loftq_iter)
            A, B = A.to(device=device, dtype=dtype), B.to(device=device, dtype=dtype)
        # "zeros": both stay zero (a placeholder that loading an adapter file fills)
        self.lora_A[name] = nn.Parameter(A)
        self.lora_B[name] = nn.Parameter(B)
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if use_dora:
            norm = ops.dora_weight_norm(dense_weight(self.base_layer, dtype), A, B, self.scaling[name])
            self.lora_magnitude[name] = nn.Parameter(norm)

    def _pissa_init(self, name: str, r: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A, B from the top-r singular triplets of W; W keeps only the residual (output unchanged)."""
        if self.is_embedding:
            raise LorafitError("PiSSA init is for linear layers only")
        W = dense_weight(self.base_layer, torch.float32)  # (out, in)
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        s = self.scaling[name]
        root = (S[:r] / s).sqrt()
        A = root[:, None] * Vh[:r]  # (r, in)
        B = U[:, :r] * root[None, :]  # (out, r)
        write_weight(self.base_layer, W - s * (B @ A))
        _, dtype = adapter_placement(self.base_layer)
        self.pissa_init[name] = (A.clone().to(dtype), B.clone().to(dtype))
        return A.to(dtype), B.to(dtype)

    def remove(self, name: str) -> None:
        if name in self.merged:
            self.unmerge([name])
        for store in (self.lora_A, self.lora_B, self.lora_magnitude, self.lora_dropout):
            if name in store:
                del store[name]
        for store in (self.scaling, self.user_scale, self.pissa_init):
            store.pop(name, None)
        self.active = [a for a in self.active if a != name]

    def adapter_names(self) -> list[str]:
        return list(self.lora_A.keys())

    def adapter_params(self, name: str) -> list[nn.Parameter]:
        params = [self.lora_A[name], self.lora_B[name]]
        if name in self.lora_magnitude:
            params.append(self.lora_magnitude[name])
        return params

    def effective_scaling(self, name: str) -> float:
        return self.scaling[name] * self.user_scale[name]

    def delta_weight(self, name: str) -> torch.Tensor:
        """scaling * B @ A as a dense (out, in) matrix (embeddings: (num, dim)), fp32."""
        A, B = self.lora_A[name].detach().float(), self.lora_B[name].detach().float()
        dW = self.effective_scaling(name) * (B @ A)  # (out, in)
        return dW.t() if self.is_embedding else dW

    # -- forward ----------------------------------------------------------------------------
    def fused_adapter(self) -> str | None:
        """The adapter the fused Function would run for this layer now, or None when it does not apply:
        `fused` on, one active, unmerged LoRA/DoRA adapter on a frozen Linear or quantized base, no
        routing, not an embedding, plain (or no) dropout."""
        if not self.fused or self.disabled or self.routing is not None or self.is_embedding:
            return None
        names = [n for n in self.active if n in self.lora_A and n not in self.merged]
        if len(names) != 1 or fused_weight_source(self.base_layer) is None:
            return None  # (merged adapters are already in the base weight, which the fused path reads)
        if not isinstance(self.lora_dropout[names[0]], (nn.Dropout, nn.Identity)):
            return None
        return names[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.routing is not None and not self.disabled:  # serving: each row its own adapter
            return self.routing.forward(self, x, self.base_layer(x))
        if (name := self.fused_adapter()) is not None:
            return self._fused_forward(x, name)  # one autograd node; same numbers
        y = self.base_layer(x)
        if self.disabled:
            return y
        for name in self.active:
            if name in self.merged or name not in self.lora_A:
                continue
            if self.is_embedding:
                y = y + self._embedding_delta(x, name).to(y.dtype)
            elif name in self.lora_magnitude:
                y = self._dora(x, y, name)
            else:
                A = self.lora_A[name]
                h = self.lora_dropout[name](x.to(A.dtype))
                delta = ops.lora_delta(h, A, self.lora_B[name], self.effective_scaling(name))
                # in place: the base output is not saved for backward, so this spares one (..., out) buffer
                y = y.add_(delta.to(y.dtype))
        return y

    def _fused_forward(self, x: torch.Tensor, name: str) -> torch.Tensor:
        weight, weight_fn = fused_weight_source(self.base_layer)
        dropout = self.lora_dropout[name]
        p = dropout.p if isinstance(dropout, nn.Dropout) else 0.0
        half = x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)  # tensor cores: 16-bit low-rank path
        return fused_lora_linear(
            x, self.lora_A[name], self.lora_B[name], self.effective_scaling(name),
            weight=weight, weight_fn=weight_fn, bias=getattr(self.base_layer, "bias", None),
            magnitude=self.lora_magnitude.get(name), dropout=p, training=self.training,
            compute_dtype=x.dtype if half else None,
        )

    def _embedding_delta(self, ids: torch.Tensor, name: str) -> torch.Tensor:
        # A is stored (r, num) as in PEFT: a lookup of its columns gives each token's (r,) code.
        h = F.embedding(ids, self.lora_A[name].t())  # (..., r)
        return (h @ self.lora_B[name].t()) * self.effective_scaling(name)  # (..., dim)

    def _dora(self, x: torch.Tensor, y: torch.Tensor, name: str) -> torch.Tensor:
        A, B, m = self.lora_A[name], self.lora_B[name], self.lora_magnitude[name]
        s = self.effective_scaling(name)
        W = dense_weight(self.base_layer, A.dtype)  # (out, in)
        norm = ops.dora_weight_norm(W, A.detach(), B.detach(), s).detach()  # (out,)
        factor = (m / norm).to(y.dtype)  # (out,)
        dropout = self.lora_dropout[name]
        h = dropout(x.to(A.dtype))
        if isinstance(dropout, nn.Identity) or not self.training:
            bias = getattr(self.base_layer, "bias", None)
            base_out = y if bias is None else y - bias  # W x, reused from the base call
        else:
            base_out = F.linear(h, W).to(y.dtype)  # W dropout(x): the DoRA path sees dropped input
        lora_out = ops.lora_delta(h, A, B, s).to(y.dtype)
        return y + (factor - 1) * base_out + factor * lora_out

    # -- merge ------------------------------------------------------------------------------
    def merge(self, names: list[str] | None = None) -> None:
        """Fold adapters into the base weight (fp32 arithmetic; requantizes a quantized base)."""
        for name in names if names is not None else self.active:
            if name in self.merged or name not in self.lora_A:
                continue
            W_new, factor = self.merged_weight(name, dense_weight(self.base_layer, torch.float32))
            write_weight(self.base_layer, W_new)
            self.merged[name] = factor

    def merged_weight(self, name: str, W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(W with adapter `name` folded in, DoRA's per-row factor or None), in fp32, exact.

        LoRA: W + s*BA. DoRA: m / ||W + s*BA||_row * (W + s*BA)."""
        dW = self.delta_weight(name)
        if name not in self.lora_magnitude:
            return W + dW, None
        factor = self.lora_magnitude[name].detach().float() / torch.linalg.vector_norm(W + dW, dim=1)  # (out,)
        return factor[:, None] * (W + dW), factor

    def unmerge(self, names: list[str] | None = None) -> None:
        """Undo `merge` in reverse order, restoring the base weight (to float rounding)."""
        for name in reversed(list(self.merged)):
            if names is not None and name not in names:
                continue
            factor = self.merged.pop(name)
            W = dense_weight(self.base_layer, torch.float32)
            if factor is not None:
                W = W / factor[:, None]
            write_weight(self.base_layer, W - self.delta_weight(name))

    def extra_repr(self) -> str:
        ranks = {n: a.shape[0] for n, a in self.lora_A.items()}
        return f"in={self.in_features}, out={self.out_features}, adapters={ranks}, active={self.active}"


class ModulesToSave(nn.Module):
    """A module trained in full: the original stays frozen, each adapter gets its own copy."""

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.original = original
        self.copies = nn.ModuleDict()
        self.active: str | None = None
        self.disabled = False

    def add(self, name: str) -> None:
        import copy

        self.copies[name] = copy.deepcopy(self.original)
        for p in self.copies[name].parameters():
            p.requires_grad_(True)

    def remove(self, name: str) -> None:
        if name in self.copies:
            del self.copies[name]
        if self.active == name:
            self.active = None

    def forward(self, *args, **kwargs):
        if self.disabled or self.active not in self.copies:
            return self.original(*args, **kwargs)
        return self.copies[self.active](*args, **kwargs)
