"""Frozen linear layers whose weight lives only in packed low-bit form (QLoRA, Dettmers et al. 2023).

`PackedLinear` is the protocol the LoRA layer wraps: `in_features`, `out_features`, `forward(x)`,
`dequantize(dtype) -> (out, in)` and `set_weight(W)` (requantize in place after a merge). The forward
pass goes through `DequantLinearFunction`: forward is `matmul(x)` (dequantize then multiply, or for an
NF4 weight on CUDA with a few tokens the fused Triton kernel, as `lorafit.quant.backend` decides), and
backward dequantizes again, so the dense weight never outlives one matmul and is never stored for
autograd.

The packed buffers keep their dtype and values under `module.to(...)`: only the device follows, so a
`model.to(torch.bfloat16)` can neither requantize nor corrupt them.
"""

from __future__ import annotations

import torch
from torch import nn

from lorafit.quant.nf4 import NF4Tensor, dynamic_map, quantize_nf4


class DequantLinearFunction(torch.autograd.Function):
    """y = x W^T with W the packed weight of `base`, computed on the fly (`base.matmul(x)`).

    Gradient: dL/dx = (dL/dy) W, with W dequantized again in backward (nothing dense is saved).
    The weight is frozen, so there is no dL/dW; the base module is not a tensor and gets None.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, base: PackedLinear) -> torch.Tensor:
        ctx.base = base
        return base.matmul(x)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None
        weight = ctx.base.dequantize(grad_out.dtype)  # (out, in)
        return grad_out @ weight, None


class PackedLinear(nn.Module):
    """Base of the frozen quantized linears: shared forward, bias handling and device-only `.to()`."""

    in_features: int
    out_features: int

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        raise NotImplementedError

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) @ W^T without the bias; subclasses with a fused kernel override it."""
        return torch.nn.functional.linear(x, self.dequantize(x.dtype))

    def set_weight(self, weight: torch.Tensor) -> None:
        raise NotImplementedError

    def _check_weight_shape(self, weight: torch.Tensor) -> None:
        from lorafit.errors import LorafitError

        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise LorafitError(
                f"{type(self).__name__}.set_weight got shape {tuple(weight.shape)}, expected "
                f"({self.out_features}, {self.in_features}); pass the merged (out, in) weight"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = DequantLinearFunction.apply(x, self)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out

    def _apply(self, fn, recurse: bool = True):
        # Move packed buffers by device only; a dtype cast would destroy the codes and statistics.
        anchor = next(b for b in self._buffers.values() if b is not None)
        device = fn(torch.empty(0, device=anchor.device)).device
        saved = dict(self._buffers)
        self._buffers.clear()
        try:
            super()._apply(fn, recurse)
        finally:
            for name, buf in saved.items():
                self._buffers[name] = None if buf is None else buf.to(device)
        return self

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class NF4Linear(PackedLinear):
    """A frozen linear layer stored as NF4 codes with (optionally double-quantized) block statistics.

    Buffers: `packed` (ceil(out*in/2),) uint8; `absmax` (n_blocks,) uint8 codes (double quant) or fp32;
    with double quant also `state2` fp32 and `offset` fp32 scalar. The 256-entry dynamic map is a
    constant and is not stored per layer.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, blocksize: int = 64,
                 double_quant: bool = True, compute_dtype: torch.dtype | None = None) -> None:
        out_features, in_features = weight.shape
        super().__init__(in_features, out_features, bias)
        self.blocksize = blocksize
        self.double_quant = double_quant
        self.compute_dtype = compute_dtype
        self._store(quantize_nf4(weight, blocksize=blocksize, double_quant=double_quant))

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = 64, double_quant: bool = True,
                    compute_dtype: torch.dtype | None = None) -> NF4Linear:
        return cls(linear.weight.data, linear.bias.data if linear.bias is not None else None,
                   blocksize=blocksize, double_quant=double_quant, compute_dtype=compute_dtype)

    @classmethod
    def from_nf4(cls, tensor: NF4Tensor, bias: torch.Tensor | None = None) -> NF4Linear:
        """Wrap an already quantized weight (e.g. read from a bitsandbytes checkpoint) without requantizing."""
        module = cls.__new__(cls)
        out_features, in_features = tensor.shape
        PackedLinear.__init__(module, in_features, out_features, bias)
        module.blocksize = tensor.blocksize
        module.double_quant = tensor.double_quant
        module.compute_dtype = None
        module._store(tensor)
        return module

    def _store(self, t: NF4Tensor) -> None:
        self.weight_dtype = t.dtype
        self.register_buffer("packed", t.packed)
        self.register_buffer("absmax", t.absmax)
        self.register_buffer("state2", t.state2)
        self.register_buffer("offset", t.offset)

    def nf4(self) -> NF4Tensor:
        """The stored weight as an `NF4Tensor` (sharing storage with the buffers)."""
        code2 = dynamic_map(self.packed.device) if self.state2 is not None else None
        return NF4Tensor(self.packed, self.absmax, torch.Size((self.out_features, self.in_features)),
                         self.weight_dtype, self.blocksize, self.state2, code2, self.offset)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.nf4().dequantize(dtype or self.compute_dtype or torch.float32)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return self.nf4().matmul(x)

    @torch.no_grad()
    def set_weight(self, weight: torch.Tensor) -> None:
        self._check_weight_shape(weight)
        self._store(quantize_nf4(weight.to(self.packed.device), self.blocksize, self.double_quant))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", blocksize={self.blocksize}, double_quant={self.double_quant}"


def weight_storage_bytes(module: nn.Module) -> tuple[int, int]:
    """(bytes of packed weight storage, number of base weight parameters) over all PackedLinear layers.

    Counts every buffer of the quantized layers (codes and statistics), not their biases.
    """
    nbytes = params = 0
    for m in module.modules():
        if isinstance(m, PackedLinear):
            nbytes += sum(b.numel() * b.element_size() for b in m.buffers(recurse=False))
            params += m.in_features * m.out_features
    return nbytes, params
