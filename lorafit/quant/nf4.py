"""4-bit NormalFloat (NF4) block quantization with double quantization, bit-compatible with bitsandbytes.

NF4 is the data type of QLoRA (Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs"):
each block of 64 weights is scaled by its absolute maximum into [-1, 1] and every value is replaced by
the index of the nearest of 16 levels placed at quantiles of a standard normal. Two 4-bit indices share
one byte, the first value in the high nibble. *Double quantization* then compresses the per-block fp32
absmax values: their mean (`offset`) is subtracted and the centred values are quantized to 8 bits with
the signed "dynamic" map (Dettmers 2016) in blocks of 256, keeping one fp32 absmax per 256 blocks.

Everything here reproduces bitsandbytes' CPU results byte for byte (tests/parity/test_nf4_bnb.py):

* 4-bit codes: `x * (1 / absmax)` clamped to [-1, 1], then the number of level midpoints strictly below
  the value (a tie on a midpoint goes to the lower level). An absmax of 0 is treated as 1e-38, so an
  all-zero block gets code 7 (the level 0.0). The last, partial block divides instead of multiplying
  by the reciprocal, and an odd element count is padded with one 0.0 (code 7) to fill the last byte.
* 8-bit statistics: bitsandbytes' CPU kernel does not search the map directly; it maps the normalized
  value to one of 65536 evenly spaced bins over [-1, 1] (index = trunc(fma((v + 1) / 2, 65535, 0.5)) in
  fp32) and reads the code from a table that holds, for each bin centre, the number of map midpoints
  below it. We build the same table and emulate the fused multiply-add in float64 followed by one
  rounding to fp32, which gives the same truncation. A block whose absmax is 0 gets code 0.

On CPU both directions run a small C kernel (lorafit/ops/cpu/nf4.c, compiled on first use) that
repeats this arithmetic in the same order; the PyTorch code here is the reference it is tested against
and the fallback (no compiler, other devices, LORAFIT_NO_CKERNEL=1, or backend="torch"). Its hot loops
are plain vectorized PyTorch; for tensors of 2**20 elements or more, quantization runs a
`torch.compile`d version of the same arithmetic fused into one pass (falling back to eager if compiling
fails; set LORAFIT_NO_COMPILE=1 to skip it). All paths give the same bytes.
"""

from __future__ import annotations

import ctypes
import functools
import os
from dataclasses import dataclass

import torch

from lorafit.errors import LorafitError
from lorafit.ops.cpu import nf4 as cnf4

# The 16 NF4 levels from the QLoRA paper (quantiles of N(0, 1), normalized to [-1, 1], exact zero).
NF4_LEVELS: tuple[float, ...] = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
VALID_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
STATS_BLOCKSIZE = 256  # block size of the second-level (absmax) quantization, fixed by bitsandbytes
# fp32 midpoints between neighbouring levels (computed in fp32, exactly as the search boundaries).
_NF4_MIDPOINTS: tuple[float, ...] = tuple(
    ((torch.tensor(NF4_LEVELS[:-1]) + torch.tensor(NF4_LEVELS[1:])) / 2).tolist()
)
_LUT_BINS = 65536
_COMPILE_MIN_NUMEL = 1 << 20  # below this, eager is fast enough and compiling is not worth its start-up
BACKENDS = ("auto", "c", "torch")


@functools.cache
def _nf4_levels(device: torch.device) -> torch.Tensor:
    return torch.tensor(NF4_LEVELS, dtype=torch.float32, device=device)


@functools.cache
def _nf4_midpoints(device: torch.device) -> torch.Tensor:
    return torch.tensor(_NF4_MIDPOINTS, dtype=torch.float32, device=device)  # (15,) search boundaries


@functools.cache
def dynamic_map(device: torch.device | str = "cpu") -> torch.Tensor:
    """The signed 8-bit dynamic map (256 sorted fp32 values in [-1, 1]).

    Layer i of 7 places 2**i values at the midpoints of an even split of [0.1, 1], scaled by 10**(i-6),
    mirrored to negatives; 0 and 1 complete the 256 entries. Built in fp32 step by step, so every value
    equals bitsandbytes' `create_dynamic_map()` bit for bit.
    """
    layers = []
    for i in range(7):
        edges = torch.linspace(0.1, 1.0, 2**i + 1, dtype=torch.float32)
        centres = (edges[:-1] + edges[1:]) / 2.0
        layers.append(centres * (10.0 ** (i - 6)))
    positive = torch.cat(layers)  # (127,)
    values = torch.cat([positive, -positive, torch.tensor([0.0, 1.0])])  # (256,)
    return values.sort().values.to(device)


@functools.cache
def _dynamic_lut(device: torch.device) -> torch.Tensor:
    """(65536,) uint8: for each evenly spaced bin centre in [-1, 1], the dynamic-map code it maps to."""
    code = dynamic_map("cpu")
    midpoints = (code[:-1] + code[1:]) * 0.5
    i = torch.arange(_LUT_BINS, dtype=torch.float32)
    centres = (i + i) / float(_LUT_BINS - 1) - 1.0
    return torch.searchsorted(midpoints, centres, side="left").to(torch.uint8).to(device)


@dataclass
class NF4Tensor:
    """A weight stored as packed NF4 codes plus its (optionally double-quantized) block statistics.

    packed:    (ceil(numel / 2),) uint8, two codes per byte, first element in the high nibble.
    absmax:    (n_blocks,) uint8 dynamic-map codes of `absmax - offset` when double-quantized,
               else (n_blocks,) fp32 block absmax values.
    state2:    (ceil(n_blocks / 256),) fp32 absmax of the centred statistics (double quant only).
    code2:     (256,) fp32 dynamic map used for the statistics (double quant only).
    offset:    0-dim fp32 mean of the block absmax values (double quant only).
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int = 64
    state2: torch.Tensor | None = None
    code2: torch.Tensor | None = None
    offset: torch.Tensor | None = None

    @property
    def double_quant(self) -> bool:
        return self.state2 is not None

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    def block_absmax(self) -> torch.Tensor:
        """(n_blocks,) fp32 absmax per block, decoding the double-quantized statistics if needed."""
        if not self.double_quant:
            return self.absmax.float()
        assert self.code2 is not None and self.offset is not None and self.state2 is not None
        return dequantize_blockwise_8bit(self.absmax, self.state2, self.code2) + self.offset

    def dequantize(self, dtype: torch.dtype = torch.float32, backend: str = "auto") -> torch.Tensor:
        """The weight as a dense `dtype` tensor of the original shape (computed in fp32, then cast).

        backend: as in `quantize_nf4`; the C kernel and the PyTorch reference give equal tensors.
        """
        lib = _cpu_kernel(self.packed.device, backend)
        if lib is None:
            return dequantize_nf4_packed(self.packed, self.block_absmax(), self.shape, self.blocksize, dtype)
        packed = self.packed.contiguous()
        if not self.double_quant:
            return cnf4.dequantize_4bit(packed, self.shape, self.blocksize, dtype, lib,
                                        absmax=self.absmax.float().contiguous())
        assert self.code2 is not None and self.offset is not None and self.state2 is not None
        return cnf4.dequantize_4bit(packed, self.shape, self.blocksize, dtype, lib,
                                    qabsmax=self.absmax.to(torch.uint8).contiguous(),
                                    code2=self.code2.float().contiguous(), absmax2=self.state2.float().contiguous(),
                                    offset=float(self.offset))

    def storage_tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.packed, self.absmax, self.state2, self.code2, self.offset) if t is not None]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.storage_tensors())

    def to(self, device: torch.device | str) -> NF4Tensor:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return NF4Tensor(
            self.packed.to(device), self.absmax.to(device), self.shape, self.dtype, self.blocksize,
            move(self.state2), move(self.code2), move(self.offset),
        )


# ---------------------------------------------------------------------------------------------------------
# 8-bit dynamic blockwise quantization of the statistics


def quantize_blockwise_8bit(x: torch.Tensor, blocksize: int = STATS_BLOCKSIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a 1-D fp32 tensor to dynamic-map codes in blocks; returns (uint8 codes, fp32 absmax)."""
    x = x.reshape(-1).float()
    n = x.numel()
    n_blocks = -(-n // blocksize)
    padded = torch.nn.functional.pad(x, (0, n_blocks * blocksize - n)).view(n_blocks, blocksize)
    absmax = padded.abs().amax(dim=1)  # (n_blocks,)
    inv = torch.where(absmax > 0, 1.0 / absmax, torch.zeros_like(absmax))
    half = ((padded * inv[:, None]).clamp_(-1.0, 1.0) + 1.0) * 0.5  # (n_blocks, blocksize) in [0, 1]
    # fma(half, 65535, 0.5) rounded once to fp32: exact in float64 wherever the truncation can change.
    bins = (half.double() * float(_LUT_BINS - 1) + 0.5).float().long()
    codes = _dynamic_lut(x.device)[bins]
    codes = torch.where(absmax[:, None] > 0, codes, torch.zeros_like(codes))
    return codes.reshape(-1)[:n], absmax


def dequantize_blockwise_8bit(
    codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int = STATS_BLOCKSIZE
) -> torch.Tensor:
    """Inverse of `quantize_blockwise_8bit`: code[q] * absmax[block], fp32."""
    n = codes.numel()
    values = code[codes.reshape(-1).long()]
    n_blocks = absmax.numel()
    padded = torch.nn.functional.pad(values, (0, n_blocks * blocksize - n)).view(n_blocks, blocksize)
    return (padded * absmax[:, None]).reshape(-1)[:n]


# ---------------------------------------------------------------------------------------------------------
# 4-bit NF4


def _codes_full_blocks(blocks: torch.Tensor, midpoints: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager: (n_blocks, bs) fp32 -> ((n_blocks, bs) uint8 codes, (n_blocks,) fp32 absmax)."""
    absmax = blocks.abs().amax(dim=1)  # (n_blocks,)
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38))[:, None]).clamp_(-1.0, 1.0)
    codes = torch.bucketize(scaled, midpoints, out_int32=True).to(torch.uint8)
    return codes, absmax


def _codes_full_blocks_fusable(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same arithmetic as `_codes_full_blocks`, written as 15 comparisons so a compiler can fuse it."""
    absmax = blocks.abs().amax(dim=1, keepdim=True)  # (n_blocks, 1)
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38))).clamp(-1.0, 1.0)
    codes = torch.zeros_like(scaled, dtype=torch.int32)
    for mid in _NF4_MIDPOINTS:
        codes = codes + (scaled > mid).to(torch.int32)
    codes = codes.to(torch.uint8).view(codes.shape[0], -1, 2)  # (n_blocks, bs/2, 2)
    return (codes[..., 0] << 4) | codes[..., 1], absmax.view(-1)


@functools.cache
def _compiled_codes():
    return torch.compile(_codes_full_blocks_fusable, dynamic=True)


def _use_compiled(numel: int) -> bool:
    return numel >= _COMPILE_MIN_NUMEL and os.environ.get("LORAFIT_NO_COMPILE", "") in ("", "0")


def _pack_full_blocks(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(n_blocks, bs) fp32 -> ((n_blocks * bs / 2,) packed uint8, (n_blocks,) fp32 absmax)."""
    if _use_compiled(blocks.numel()):
        try:
            packed, absmax = _compiled_codes()(blocks)
            return packed.reshape(-1), absmax
        except Exception:  # no C++ compiler / unsupported backend: the eager path gives the same bytes
            pass
    codes, absmax = _codes_full_blocks(blocks, _nf4_midpoints(blocks.device))
    codes = codes.view(-1, 2)  # (n/2, 2)
    return (codes[:, 0] << 4) | codes[:, 1], absmax


def _quantize_4bit_torch(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: (n,) fp32 -> ((ceil(n / 2),) packed uint8, (n_blocks,) fp32 absmax)."""
    n = flat.numel()
    rem = n % blocksize
    full = n - rem
    parts, absmaxes = [], []
    if full:
        packed, absmax = _pack_full_blocks(flat[:full].view(-1, blocksize))  # blocks: (n_full, bs)
        parts.append(packed)
        absmaxes.append(absmax)
    if rem:
        tail = flat[full:]
        am = tail.abs().max().clamp(min=1e-38)
        scaled = (tail / am).clamp(-1.0, 1.0)
        if rem % 2:
            scaled = torch.nn.functional.pad(scaled, (0, 1))  # the pad value 0.0 becomes code 7
        codes = torch.bucketize(scaled, _nf4_midpoints(flat.device), out_int32=True).to(torch.uint8)
        parts.append((codes[0::2] << 4) | codes[1::2])
        absmaxes.append(am.reshape(1))
    packed = torch.cat(parts) if len(parts) > 1 else parts[0]
    absmax = torch.cat(absmaxes) if len(absmaxes) > 1 else absmaxes[0]
    return packed, absmax


def _cpu_kernel(device: torch.device, backend: str) -> ctypes.CDLL | None:
    """The NF4 C kernel library when `backend` allows it for tensors on `device`, else None."""
    if backend not in BACKENDS:
        raise LorafitError(f"unknown NF4 backend {backend!r}; use one of {BACKENDS}")
    if backend == "torch" or device.type != "cpu":
        return None
    lib = cnf4.library()
    if lib is None and backend == "c":
        raise LorafitError("the NF4 C kernel is unavailable (LORAFIT_NO_CKERNEL=1, no C compiler, or it failed to build)")
    return lib


def quantize_nf4(weight: torch.Tensor, blocksize: int = 64, double_quant: bool = True,
                 backend: str = "auto") -> NF4Tensor:
    """Quantize `weight` (fp32/bf16/fp16, any shape) to NF4; byte-identical to bitsandbytes on CPU.

    backend: "auto" uses the C kernel (lorafit.ops.cpu) for CPU tensors when it is available, "c"
    requires it, "torch" runs the PyTorch reference. All give the same bytes.
    """
    if blocksize not in VALID_BLOCKSIZES:
        raise LorafitError(f"NF4 blocksize {blocksize} is not supported; use one of {VALID_BLOCKSIZES}")
    if weight.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise LorafitError(f"NF4 quantization needs a float32/bfloat16/float16 tensor, got {weight.dtype}")
    if weight.numel() == 0:
        raise LorafitError(f"cannot NF4-quantize an empty tensor of shape {tuple(weight.shape)}")
    flat = weight.detach().reshape(-1).float()
    lib = _cpu_kernel(flat.device, backend)
    if lib is not None:
        packed, absmax = cnf4.quantize_4bit(flat.contiguous(), blocksize, lib)
    else:
        packed, absmax = _quantize_4bit_torch(flat, blocksize)
    out = NF4Tensor(packed=packed, absmax=absmax, shape=weight.shape, dtype=weight.dtype, blocksize=blocksize)
    if double_quant:
        offset = absmax.mean()
        if lib is not None:
            out.absmax, out.state2 = cnf4.quantize_stats(absmax, offset.item(), _dynamic_lut(flat.device),
                                                         STATS_BLOCKSIZE, lib)
        else:
            out.absmax, out.state2 = quantize_blockwise_8bit(absmax - offset, STATS_BLOCKSIZE)
        out.code2 = dynamic_map(flat.device).clone()
        out.offset = offset
    return out


@functools.cache
def _byte_pair_table(device: torch.device) -> torch.Tensor:
    """(256, 2) fp32: the two NF4 levels encoded by each byte (high nibble first)."""
    levels = _nf4_levels(device)
    b = torch.arange(256, device=device)
    return torch.stack([levels[b >> 4], levels[b & 15]], dim=1).contiguous()


def dequantize_nf4_packed(
    packed: torch.Tensor, absmax: torch.Tensor, shape: torch.Size | tuple[int, ...], blocksize: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Packed NF4 codes and fp32 block absmax -> dense `dtype` tensor of `shape` (level * absmax in fp32)."""
    n = 1
    for d in shape:
        n *= d
    n_blocks = absmax.numel()
    # One table lookup per byte yields both levels; then one in-place scale by the block absmax.
    # The (256, 2) fp32 table is read as 256 8-byte words: index_select on a 1-D table is a plain
    # gather, about 20x faster on CPU than embedding/fancy indexing of 2-wide rows.
    pairs = _byte_pair_table(packed.device).view(torch.float64).view(-1)  # (256,) one word = two levels
    values = torch.index_select(pairs, 0, packed.reshape(-1).int()).view(torch.float32)  # (2 * n_bytes,)
    if values.numel() != n_blocks * blocksize:
        values = torch.nn.functional.pad(values[:n], (0, n_blocks * blocksize - n))
    values = values.view(n_blocks, blocksize).mul_(absmax[:, None])  # (n_blocks, bs)
    return values.reshape(-1)[:n].view(shape).to(dtype)
