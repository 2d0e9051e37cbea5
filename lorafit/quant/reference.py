"""The pure-PyTorch reference of NF4 (QLoRA, Dettmers et al. 2023): the arithmetic every fast kernel is
tested against, byte for byte, and the fallback wherever no kernel runs.

NF4 scales each block of 64 weights by its absolute maximum into [-1, 1] and replaces every value by
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

Functions take and return plain tensors (no `NF4Tensor`), like the kernels in `cpu/` and `triton/`.
"""

from __future__ import annotations

import functools

import torch

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
LUT_BINS = 65536


@functools.cache
def nf4_levels(device: torch.device) -> torch.Tensor:
    """(16,) fp32 NF4 levels on `device` (cached: the kernels read it as a lookup table)."""
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
def dynamic_lut(device: torch.device) -> torch.Tensor:
    """(65536,) uint8: for each evenly spaced bin centre in [-1, 1], the dynamic-map code it maps to."""
    code = dynamic_map("cpu")
    midpoints = (code[:-1] + code[1:]) * 0.5
    i = torch.arange(LUT_BINS, dtype=torch.float32)
    centres = (i + i) / float(LUT_BINS - 1) - 1.0
    return torch.searchsorted(midpoints, centres, side="left").to(torch.uint8).to(device)


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
    bins = (half.double() * float(LUT_BINS - 1) + 0.5).float().long()
    codes = dynamic_lut(x.device)[bins]
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


def _pack_full_blocks(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(n_blocks, bs) fp32 -> ((n_blocks * bs / 2,) packed uint8, (n_blocks,) fp32 absmax)."""
    codes, absmax = _codes_full_blocks(blocks, _nf4_midpoints(blocks.device))
    codes = codes.view(-1, 2)  # (n/2, 2)
    return (codes[:, 0] << 4) | codes[:, 1], absmax


def quantize_4bit(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
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


@functools.cache
def _byte_pair_table(device: torch.device) -> torch.Tensor:
    """(256, 2) fp32: the two NF4 levels encoded by each byte (high nibble first)."""
    levels = nf4_levels(device)
    b = torch.arange(256, device=device)
    return torch.stack([levels[b >> 4], levels[b & 15]], dim=1).contiguous()


def dequantize_4bit(
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
