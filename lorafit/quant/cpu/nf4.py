"""Tensor-level wrappers around the NF4 C kernel (`nf4.c`); bit-identical to `lorafit.quant.reference`.

`library()` is None when the kernel cannot be used (no compiler, or the build failed); the backend
dispatch (`lorafit.quant.backend`) then takes the PyTorch path. The build happens once per process, on
first call. All tensors passed in must be contiguous and on the CPU; the caller checks dtypes.
"""

from __future__ import annotations

import ctypes
import functools
import logging
from pathlib import Path

import torch

from lorafit.errors import LorafitError
from lorafit.quant.cpu import build

log = logging.getLogger(__name__)
SOURCE = Path(__file__).with_name("nf4.c")
# Threads only pay for their start-up (tens of microseconds) above about 2**20 elements, and each
# one needs about 2**19 elements of work; the kernel hands out work in small chunks, so a thread that
# starts late on a busy machine does not delay the call.
PARALLEL_MIN_NUMEL = 1 << 20
NUMEL_PER_THREAD = 1 << 19

_p, _i64, _int, _f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
_SIGNATURES = {
    "lf_simd_level": ([], _int),
    "lf_nf4_quantize": ([_p, _i64, _i64, _p, _p, _int], None),
    "lf_quantize_stats": ([_p, _i64, _f32, _p, _p, _p], None),
    "lf_nf4_dequantize": ([_p, _i64, _i64, _p, _p, _p, _p, _f32, _p, _int, _int], None),
}


@functools.cache
def load(arch: str = build.NATIVE) -> ctypes.CDLL | None:
    """The compiled kernel for `arch` (compiled at most once per process), or None if that failed."""
    try:
        lib = build.load(SOURCE, arch)
    except Exception as e:  # no compiler, a failed build or an unloadable file: use the PyTorch path
        log.debug("NF4 C kernel unavailable, using PyTorch: %s %s", e, getattr(e, "stderr", "") or "")
        return None
    for name, (args, res) in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, res
    return lib


def library() -> ctypes.CDLL | None:
    """The kernel for this machine's CPU, or None when it cannot be built here."""
    return load()


def describe() -> str:
    """Which NF4 CPU backend is in use, for benchmark output."""
    lib = library()
    if lib is None:
        return "pytorch"
    simd = {512: "avx512", 256: "avx2"}.get(lib.lf_simd_level(), "scalar")
    return f"c-kernel ({simd}, up to {torch.get_num_threads()} threads)"


def _threads(numel: int) -> int:
    if numel < PARALLEL_MIN_NUMEL:
        return 1
    return max(1, min(torch.get_num_threads(), numel // NUMEL_PER_THREAD))


def quantize_4bit(flat: torch.Tensor, blocksize: int, lib: ctypes.CDLL) -> tuple[torch.Tensor, torch.Tensor]:
    """(n,) fp32 -> ((ceil(n / 2),) packed uint8, (n_blocks,) fp32 absmax)."""
    n = flat.numel()
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8)
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32)
    lib.lf_nf4_quantize(flat.data_ptr(), n, blocksize, packed.data_ptr(), absmax.data_ptr(), _threads(n))
    return packed, absmax


def quantize_stats(absmax: torch.Tensor, offset: float, lut: torch.Tensor, blocksize: int,
                   lib: ctypes.CDLL) -> tuple[torch.Tensor, torch.Tensor]:
    """(n_blocks,) fp32 absmax -> (uint8 codes of absmax - offset, fp32 absmax per `blocksize` codes)."""
    assert blocksize == 256, "the C kernel hard-codes the statistics block size"
    n = absmax.numel()
    codes = torch.empty(n, dtype=torch.uint8)
    absmax2 = torch.empty(-(-n // blocksize), dtype=torch.float32)
    lib.lf_quantize_stats(absmax.data_ptr(), n, offset, lut.data_ptr(), codes.data_ptr(), absmax2.data_ptr())
    return codes, absmax2


def dequantize_4bit(packed: torch.Tensor, shape: torch.Size | tuple[int, ...], blocksize: int, dtype: torch.dtype,
                    lib: ctypes.CDLL, absmax: torch.Tensor | None = None, qabsmax: torch.Tensor | None = None,
                    code2: torch.Tensor | None = None, absmax2: torch.Tensor | None = None,
                    offset: float = 0.0) -> torch.Tensor:
    """Packed codes + fp32 `absmax`, or the double-quantized (qabsmax, code2, absmax2, offset) -> `dtype`.

    fp32 and bf16 are written directly; any other dtype is computed in fp32 and cast.
    """
    out = torch.empty(shape, dtype=dtype if dtype in (torch.float32, torch.bfloat16) else torch.float32)
    n = out.numel()
    n_blocks = -(-n // blocksize)
    needed = {"packed": (packed, (n + 1) // 2), "absmax": (absmax, n_blocks), "qabsmax": (qabsmax, n_blocks),
              "code2": (code2, 256), "absmax2": (absmax2, -(-n_blocks // 256))}
    for name, (t, size) in needed.items():  # the kernel must not read past the end of any of them
        if t is not None and t.numel() < size:
            raise LorafitError(f"NF4 {name} has {t.numel()} elements, shape {tuple(shape)} needs {size}")

    def ptr(t: torch.Tensor | None) -> int | None:
        return None if t is None else t.data_ptr()

    lib.lf_nf4_dequantize(packed.data_ptr(), n, blocksize, ptr(absmax), ptr(qabsmax), ptr(code2), ptr(absmax2),
                          offset, out.data_ptr(), out.dtype == torch.bfloat16, _threads(n))
    return out.to(dtype)
