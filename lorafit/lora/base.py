"""What the LoRA layer needs of the layer it wraps, answered for every kind of base in one place.

A base kind says how to read a base layer's shape and dense weight, how to write a merged weight back,
whether the weight is quantized, and how the fused LoRA Function may read the weight. The kinds are
tried in order and the first that matches wins (PEFT's dispatch, without a class hierarchy):

    kind        matches                                   weight layout      fused Function reads
    embedding   nn.Embedding                              (num, dim)         (not fused)
    conv1d      transformers' Conv1D (GPT-2)              stored (in, out)   (not fused)
    quantized   anything with dequantize() + set_weight()  packed             base.dequantize(dtype)
                (lorafit.quant's NF4 and ternary layers)
    linear      nn.Linear (its own forward: a subclass    (out, in)          the frozen .weight
                that returns more, e.g. Llama 4's router,
                is not a linear map)

Everything else in lorafit asks here (`kind_of`, `base_dims`, `dense_weight`, `write_weight`,
`is_quantized`) instead of testing classes or attributes itself; a new kind of base is one entry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lorafit.modules import plain_linear

WeightFn = Callable[[torch.dtype], torch.Tensor]


@dataclass(frozen=True)
class BaseKind:
    name: str
    matches: Callable[[nn.Module], bool]
    dims: Callable[[nn.Module], tuple[int, int]]  # (in_features, out_features); embeddings: (num, dim)
    weight: Callable[[nn.Module, torch.dtype], torch.Tensor]  # dense (out, in), detached
    write: Callable[[nn.Module, torch.Tensor], None]  # store a dense (out, in) weight back
    quantized: bool = False
    linear: bool = True  # a linear map on the last dim (embeddings are lookups)


def _write_param(base: nn.Module, W: torch.Tensor) -> None:
    base.weight.data.copy_(W.to(base.weight.dtype))


def _write_transposed(base: nn.Module, W: torch.Tensor) -> None:
    base.weight.data.copy_(W.t().to(base.weight.dtype))


KINDS: tuple[BaseKind, ...] = (
    BaseKind("embedding", lambda m: isinstance(m, nn.Embedding),
             lambda m: (m.num_embeddings, m.embedding_dim),
             lambda m, dtype: m.weight.detach().to(dtype), _write_param, linear=False),
    BaseKind("conv1d", lambda m: isinstance(m, Conv1D),
             lambda m: (m.weight.shape[0], m.weight.shape[1]),
             lambda m, dtype: m.weight.detach().t().to(dtype), _write_transposed),
    BaseKind("quantized", lambda m: callable(getattr(m, "dequantize", None)) and callable(getattr(m, "set_weight", None))
             and hasattr(m, "in_features") and hasattr(m, "out_features"),
             lambda m: (m.in_features, m.out_features),
             lambda m, dtype: m.dequantize(dtype), lambda m, W: m.set_weight(W), quantized=True),
    BaseKind("linear", plain_linear,
             lambda m: (m.in_features, m.out_features),
             lambda m, dtype: m.weight.detach().to(dtype), _write_param),
)


def kind_of(base: nn.Module) -> BaseKind | None:
    """The first kind that matches `base`, or None when LoRA cannot wrap it."""
    return next((k for k in KINDS if k.matches(base)), None)


def _kind(base: nn.Module) -> BaseKind:
    kind = kind_of(base)
    if kind is None:
        raise TypeError(f"{type(base).__name__} is not a base layer LoRA can wrap")
    return kind


def is_adaptable(module: nn.Module) -> bool:
    return kind_of(module) is not None


def is_linear(module: nn.Module) -> bool:
    """Linear in the adapter sense: nn.Linear, GPT-2's Conv1D, or a quantized linear."""
    kind = kind_of(module)
    return kind is not None and kind.linear


def is_quantized(module: nn.Module) -> bool:
    kind = kind_of(module)
    return kind is not None and kind.quantized


def base_dims(base: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a base module; embeddings count num_embeddings as 'in'."""
    return _kind(base).dims(base)


def dense_weight(base: nn.Module, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The base weight as a dense (out, in) tensor (embeddings: (num, dim)), dequantized if needed."""
    return _kind(base).weight(base, dtype)


def write_weight(base: nn.Module, W: torch.Tensor) -> None:
    """Store a dense (out, in) weight back into the base, requantizing a quantized base."""
    _kind(base).write(base, W)


def fused_weight_source(base: nn.Module) -> tuple[torch.Tensor | None, WeightFn | None] | None:
    """How the fused LoRA Function reads this base's weight: (frozen dense (out, in) weight, None),
    (None, dequantizer) for a quantized base, or None where the fused path does not apply."""
    kind = kind_of(base)
    if kind is None:
        return None
    if kind.name == "linear":
        return None if base.weight.requires_grad else (base.weight, None)
    if kind.quantized:
        return None, base.dequantize
    return None


def adapter_placement(base: nn.Module) -> tuple[torch.device, torch.dtype]:
    """(device, dtype) of new adapter weights on this base: the base's device, and fp32 master weights
    even on a 16-bit or 4-bit base (as PEFT does by default); fp64 on an fp64 base."""
    tensors = list(base.parameters()) + list(base.buffers())
    device = tensors[0].device if tensors else torch.device("cpu")
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    return device, dtype
