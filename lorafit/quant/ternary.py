"""Ternary weights packed 4 per byte, in the style of BitNet b1.58 (Ma et al. 2024, "The Era of 1-bit LLMs").

A weight row (or each group of `group_size` columns of it) gets the absmean scale
s = mean(|W|) + eps, and every weight becomes q = clamp(round(W / s), -1, 1) in {-1, 0, +1}; the
dense weight is q * s. Storage is 2 bits per weight: code q + 1 in {0, 1, 2}, four codes per byte with
the first column in the lowest two bits, rows padded with code 1 (zero) to a multiple of 4 columns.
Together with one fp32 scale per row this is about 0.25 bytes per parameter.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from lorafit.errors import LorafitError
from lorafit.modules import path_matches, set_submodule
from lorafit.quant.linear import PackedLinear

_SHIFTS = (0, 2, 4, 6)


def quantize_ternary(weight: torch.Tensor, group_size: int | None = None, eps: float = 1e-5
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float weight -> ((out, in) int8 in {-1, 0, 1}, (out, n_groups) fp32 scales)."""
    out_f, in_f = weight.shape
    group = group_size or in_f
    if in_f % group:
        raise LorafitError(f"ternary group_size {group} does not divide in_features {in_f}; pick a divisor")
    w = weight.detach().float().reshape(out_f, in_f // group, group)  # (out, n_groups, group)
    scale = w.abs().mean(dim=-1, keepdim=True) + eps  # (out, n_groups, 1)
    q = (w / scale).round().clamp_(-1, 1).to(torch.int8)
    return q.reshape(out_f, in_f), scale.squeeze(-1)


def pack_ternary(q: torch.Tensor) -> torch.Tensor:
    """(..., n) integer tensor with values in {-1, 0, 1} -> (..., ceil(n / 4)) uint8."""
    if q.dtype.is_floating_point or q.dtype == torch.bool:
        raise LorafitError(f"pack_ternary needs an integer tensor of -1/0/1 values, got {q.dtype}")
    if q.numel() and (q.min() < -1 or q.max() > 1):
        raise LorafitError("pack_ternary got values outside {-1, 0, 1}; ternarize with quantize_ternary first")
    n = q.shape[-1]
    codes = (q.to(torch.int16) + 1).to(torch.uint8)
    pad = (-n) % 4
    if pad:
        codes = torch.nn.functional.pad(codes, (0, pad), value=1)  # code 1 decodes to 0
    codes = codes.reshape(*q.shape[:-1], -1, 4)  # (..., ceil(n/4), 4)
    packed = codes[..., 0] | (codes[..., 1] << 2) | (codes[..., 2] << 4) | (codes[..., 3] << 6)
    return packed


@functools.cache
def _byte_values(device: torch.device) -> torch.Tensor:
    """(256,) int32: for each byte, its four values code - 1 as int8s packed in one 32-bit word."""
    b = torch.arange(256, device=device)
    values = torch.stack([((b >> s) & 3) - 1 for s in _SHIFTS], dim=1).to(torch.int8)  # (256, 4)
    return values.contiguous().view(torch.int32).view(-1)


def unpack_ternary(packed: torch.Tensor, n: int) -> torch.Tensor:
    """(..., ceil(n / 4)) uint8 -> (..., n) int8 in {-1, 0, 1}; exact inverse of `pack_ternary`.

    One table lookup per byte gives its four values at once (a 32-bit word read back as four int8s),
    so unpacking holds 1 byte per value and an index of the same size, nothing wider."""
    if packed.dtype != torch.uint8:
        raise LorafitError(f"unpack_ternary needs a uint8 tensor, got {packed.dtype}")
    words = torch.index_select(_byte_values(packed.device), 0, packed.reshape(-1).int())  # (bytes,) int32
    return words.view(torch.int8).view(*packed.shape[:-1], -1)[..., :n]  # (..., n), a view when n % 4


class TernaryLinear(PackedLinear):
    """A frozen linear layer stored as packed ternary codes and per-row (or per-group) fp32 scales."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, group_size: int | None = None,
                 compute_dtype: torch.dtype | None = None) -> None:
        out_features, in_features = weight.shape
        super().__init__(in_features, out_features, bias)
        self.group_size = group_size or in_features
        self.compute_dtype = compute_dtype
        self._store(*quantize_ternary(weight, self.group_size))

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int | None = None,
                    compute_dtype: torch.dtype | None = None) -> TernaryLinear:
        return cls(linear.weight.data, linear.bias.data if linear.bias is not None else None,
                   group_size=group_size, compute_dtype=compute_dtype)

    @classmethod
    def from_ternary(cls, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
                     ) -> TernaryLinear:
        """Wrap exact ternary values q (out, in) and scales (out, n_groups) without re-ternarizing."""
        module = cls.__new__(cls)
        out_features, in_features = q.shape
        PackedLinear.__init__(module, in_features, out_features, bias)
        module.group_size = in_features // scale.shape[1]
        module.compute_dtype = None
        module._store(q, scale)
        return module

    def _store(self, q: torch.Tensor, scale: torch.Tensor) -> None:
        self._as_buffers({"packed": pack_ternary(q),  # (out, ceil(in/4))
                          "scale": scale.float().contiguous()})  # (out, n_groups)

    def storage_shapes(self) -> dict[str, tuple[int, ...]]:
        """Both are rows of the weight already: `packed` (out, ceil(in/4)), `scale` (out, n_groups)."""
        return {"packed": tuple(self.packed.shape), "scale": tuple(self.scale.shape)}

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """q * scale in `dtype`, computed in `dtype`: with q in {-1, 0, 1} the product is exact, so this
        equals the fp32 product rounded to `dtype`, bit for bit, while holding only the int8 values
        and the output (1 + d bytes per weight; the lookup's index and result, 2 bytes, before)."""
        dtype = dtype or self.compute_dtype or torch.float32
        w = unpack_ternary(self.packed, self.in_features).to(dtype)  # (out, in), contiguous
        w.view(self.out_features, -1, self.group_size).mul_(self.scale.to(dtype)[:, :, None])  # per group
        return w

    @torch.no_grad()
    def set_weight(self, weight: torch.Tensor) -> None:
        """Re-ternarize `weight` (lossy unless it is already ternary-valued per group)."""
        self._check_weight_shape(weight)
        self._store(*quantize_ternary(weight.to(self.packed.device), self.group_size))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", group_size={self.group_size}"


def _exact_ternary(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """If every group of `weight` is s * {-1, 0, 1} for one s, return (q, scales) reproducing it exactly."""
    out_f, in_f = weight.shape
    if in_f % group_size:
        return None
    w = weight.detach().float().view(out_f, in_f // group_size, group_size)  # (out, n_groups, group)
    scale = w.abs().amax(dim=-1)  # (out, n_groups): the one nonzero magnitude, if ternary
    nonzero = w != 0
    if not torch.all(~nonzero | (w.abs() == scale[..., None])):
        return None
    q = torch.sign(w).to(torch.int8).view(out_f, in_f)
    return q, scale


def convert_to_packed(model: nn.Module, skip: tuple[str, ...] = ("lm_head",), group_size: int | None = None,
                      requantize: bool = False) -> nn.Module:
    """Replace each `nn.Linear` holding ternary-valued weights with an equivalent `TernaryLinear`, in place.

    A weight qualifies when every row (or group of `group_size` columns) is one scale times {-1, 0, 1};
    the packed layer then reproduces it exactly. Other layers raise LorafitError unless `requantize=True`,
    which ternarizes them with absmean scales (lossy, e.g. after merging a LoRA adapter).
    """
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or path_matches(name, skip):
            continue
        bias = module.bias.data if module.bias is not None else None
        exact = _exact_ternary(module.weight.data, group_size or module.in_features)
        if exact is not None:
            packed = TernaryLinear.from_ternary(*exact, bias=bias)
        elif requantize:
            packed = TernaryLinear(module.weight.data, bias, group_size=group_size)
        else:
            raise LorafitError(
                f"layer {name!r} does not hold ternary values (scale * {{-1, 0, 1}} per row); "
                "pass requantize=True to ternarize it, or add it to skip"
            )
        set_submodule(model, name, packed.to(module.weight.device))
    return model
