"""Frozen linear layers whose weight lives only in packed low-bit form (QLoRA, Dettmers et al. 2023).

`PackedLinear` is the protocol the LoRA layer wraps: `in_features`, `out_features`, `forward(x)`,
`dequantize(dtype) -> (out, in)` and `set_weight(W)` (requantize in place after a merge). The forward
pass goes through `DequantLinearFunction`: forward is `matmul(x)` (dequantize then multiply, or for an
NF4 weight on CUDA with a few tokens the fused Triton kernel, as `lorafit.quant.backend` decides), and
backward dequantizes again, so the dense weight never outlives one matmul and is never stored for
autograd.

The packed buffers keep their dtype and values under `module.to(...)`: only the device follows, so a
`model.to(torch.bfloat16)` can neither requantize nor corrupt them.

Sharding: FSDP2 (`torch.distributed.fsdp.fully_shard`) shards a module's parameters, never its buffers.
`storage_as_parameters()` re-registers the packed storage as frozen Parameters, rows first: NF4 codes
as (out, in/2) and block statistics as (out, in/blocksize) where the width allows, ternary codes
(out, ceil(in/4)) and scales (out, n_groups) as they are, so that FSDP's dim-0 shards hold the codes
and statistics of the same rows; the weight itself (the same bytes) is unchanged.
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
    STORAGE: tuple[str, ...] = ()
    """Names of the packed storage tensors held as Parameters (after `storage_as_parameters`)."""

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
        # Move packed storage by device only; a dtype cast would destroy the codes and statistics.
        buffers = dict(self._buffers)
        params = {n: self._parameters.pop(n) for n in self.STORAGE if n in self._parameters}
        anchor = next(t for t in (*buffers.values(), *params.values()) if t is not None)
        device = fn(torch.empty(0, device=anchor.device)).device
        self._buffers.clear()
        try:
            super()._apply(fn, recurse)
        finally:
            for name, buf in buffers.items():
                self._buffers[name] = None if buf is None else buf.to(device)
            for name, param in params.items():
                self._parameters[name] = param if param.device == device else nn.Parameter(
                    param.data.to(device), requires_grad=False)
        return self

    def storage_shapes(self) -> dict[str, tuple[int, ...]]:
        """The shape each packed storage tensor takes as a Parameter (`storage_as_parameters`): its
        rows first where the format allows, so that dim-0 shards hold whole rows of the weight."""
        raise NotImplementedError

    def storage_as_parameters(self) -> None:
        """Hold the packed weight as frozen Parameters (what FSDP2 shards) instead of buffers, in the
        shapes of `storage_shapes`. The bytes and their order are those of the buffers, so everything
        reading the weight is unchanged. A later `set_weight` holds it as buffers again."""
        names = []
        for name, shape in self.storage_shapes().items():
            tensor = self._buffers.get(name)
            if tensor is None:
                continue  # already a Parameter, or absent (NF4 without double quantization)
            del self._buffers[name]
            self.register_parameter(name, nn.Parameter(tensor.reshape(shape), requires_grad=False))
            names.append(name)
        self.STORAGE = tuple(dict.fromkeys((*self.STORAGE, *names)))

    def _as_buffers(self, tensors: dict[str, torch.Tensor | None]) -> None:
        """Register the packed storage as buffers (dropping Parameters of the same names)."""
        for name, tensor in tensors.items():
            self._parameters.pop(name, None)
            self.register_buffer(name, tensor)
        self.STORAGE = ()

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
        self._as_buffers({name: getattr(t, name) for name in ("packed", "absmax", "state2", "offset")})

    def storage_shapes(self) -> dict[str, tuple[int, ...]]:
        """`packed` (out, in/2) and `absmax` (out, in/blocksize) when `in` is a multiple of 2 and of the
        block size (else they stay flat), `state2` (n_blocks/256,) and `offset` (1,)."""
        out, n_in = self.out_features, self.in_features
        return {"packed": (out, n_in // 2) if n_in % 2 == 0 else (-1,),
                "absmax": (out, n_in // self.blocksize) if n_in % self.blocksize == 0 else (-1,),
                "state2": (-1,), "offset": (1,)}

    def nf4(self) -> NF4Tensor:
        """The stored weight as an `NF4Tensor` (sharing storage with the buffers or parameters)."""
        code2 = dynamic_map(self.packed.device) if self.state2 is not None else None
        offset = None if self.offset is None else self.offset.reshape(())
        return NF4Tensor(self.packed.reshape(-1), self.absmax.reshape(-1),
                         torch.Size((self.out_features, self.in_features)), self.weight_dtype, self.blocksize,
                         self.state2, code2, offset)

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

    Counts every buffer of the quantized layers (codes and statistics; also when they are held as
    Parameters, `PackedLinear.storage_as_parameters`), not their biases.
    """
    nbytes = params = 0
    for m in module.modules():
        if isinstance(m, PackedLinear):
            storage = [*m.buffers(recurse=False), *(getattr(m, n) for n in m.STORAGE)]
            nbytes += sum(b.numel() * b.element_size() for b in storage)
            params += m.in_features * m.out_features
    return nbytes, params
