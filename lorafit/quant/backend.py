"""One NF4 op schema, three implementations, and the first-match rule that picks one per call.

    op            CUDA tensors              CPU tensors          anything else
    quantize      PyTorch reference         C kernel (cpu/)      PyTorch reference
    dequantize    Triton kernel (triton/)   C kernel (cpu/)      PyTorch reference
    matmul        Triton fused kernel for   dequantize + F.linear
                  <= SMALL_M tokens, else
                  dequantize + F.linear

The chain is tried in order and the first backend that can run wins: "triton" needs a CUDA tensor
and an importable triton, "c" a CPU tensor and a C compiler (the kernel is built on first use), and
"torch" (the reference, `lorafit.quant.reference`) runs anywhere. Every backend gives the same bytes
as the reference for quantize and dequantize (the fused matmul accumulates in fp32, as F.linear does,
in another order). Forward, backward, merge and export all come through here.

The choice can be pinned: `set_backend("torch")` (or the environment variable LORAFIT_NF4_BACKEND at
start-up) forces one backend for every call, and each call also takes `backend=`. A pinned backend
that cannot run on the tensor's device raises a LorafitError rather than silently running another;
"triton" runs CPU tensors only under TRITON_INTERPRET=1 (the tests).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from lorafit.device import triton_available
from lorafit.errors import LorafitError
from lorafit.quant import reference as ref
from lorafit.quant.cpu import nf4 as cnf4

BACKENDS = ("auto", "triton", "c", "torch")
SMALL_M = 16  # tokens up to which the fused Triton matmul beats dequantize + dense matmul

_pinned = os.environ.get("LORAFIT_NF4_BACKEND", "auto") or "auto"


def set_backend(name: str) -> str:
    """Use backend `name` for every NF4 call ("auto" restores the first-match rule); returns the old one."""
    global _pinned
    _check_name(name)
    previous, _pinned = _pinned, name
    return previous


def current_backend() -> str:
    return _pinned


def _check_name(name: str) -> None:
    if name not in BACKENDS:
        raise LorafitError(f"unknown NF4 backend {name!r}; use one of {', '.join(BACKENDS)}")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _runs(name: str, device: torch.device, op: str) -> bool:
    if name == "torch":
        return True
    if name == "c":
        return device.type == "cpu" and cnf4.library() is not None
    # triton: dequantize and matmul only; CPU tensors only under the interpreter
    return op != "quantize" and triton_available() and (device.type == "cuda" or _interpreting())


def choose(device: torch.device, op: str, backend: str | None = None) -> str:
    """The backend that runs `op` ("quantize", "dequantize", "matmul") on tensors on `device`."""
    name = backend or _pinned
    _check_name(name)
    if name != "auto":
        if name == "triton" and op == "quantize":
            return "torch"  # no Triton quantize kernel: the reference runs on any device
        if not _runs(name, device, op):
            reason = {"c": "it needs CPU tensors and a C compiler (set CC, or install cc/gcc)",
                      "triton": "it needs CUDA tensors and an importable triton"}[name]
            raise LorafitError(f"NF4 backend {name!r} cannot run on {device.type} tensors here: {reason}")
        return name
    for candidate in ("triton", "c", "torch"):
        if candidate == "triton" and device.type != "cuda":
            continue  # under "auto" the interpreter is never chosen: it is for tests
        if _runs(candidate, device, op):
            return candidate
    return "torch"


def describe(device: torch.device | str = "cpu") -> str:
    """Which backend dequantizes on `device` (for benchmark and log output)."""
    device = torch.device(device)
    name = choose(device, "dequantize")
    if name == "c":
        return cnf4.describe()
    return {"triton": "triton", "torch": "pytorch reference"}[name]


# -- the ops ----------------------------------------------------------------------------------------


def quantize_4bit(flat: torch.Tensor, blocksize: int, backend: str | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(n,) fp32 -> ((ceil(n / 2),) packed uint8, (n_blocks,) fp32 absmax)."""
    if choose(flat.device, "quantize", backend) == "c":
        return cnf4.quantize_4bit(flat.contiguous(), blocksize, cnf4.library())
    return ref.quantize_4bit(flat, blocksize)


def quantize_stats(absmax: torch.Tensor, offset: torch.Tensor, backend: str | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Double quantization of the (n_blocks,) fp32 absmax around `offset` (their mean):
    (uint8 codes of absmax - offset, fp32 absmax per 256 codes)."""
    if choose(absmax.device, "quantize", backend) == "c":
        return cnf4.quantize_stats(absmax.contiguous(), offset.item(), ref.dynamic_lut(absmax.device),
                                   ref.STATS_BLOCKSIZE, cnf4.library())
    return ref.quantize_blockwise_8bit(absmax - offset, ref.STATS_BLOCKSIZE)


def dequantize_4bit(packed: torch.Tensor, shape: torch.Size | tuple[int, ...], blocksize: int,
                    dtype: torch.dtype, *, absmax: torch.Tensor | None = None,
                    qabsmax: torch.Tensor | None = None, state2: torch.Tensor | None = None,
                    code2: torch.Tensor | None = None, offset: torch.Tensor | float | None = None,
                    backend: str | None = None) -> torch.Tensor:
    """Dense `dtype` weight of `shape` from packed codes and either fp32 `absmax` or the
    double-quantized statistics (`qabsmax` uint8, `state2`, `code2`, `offset`)."""
    name = choose(packed.device, "dequantize", backend)
    double = qabsmax is not None
    if name == "torch":
        if double:
            absmax = ref.dequantize_blockwise_8bit(qabsmax, state2, code2) + offset
        return ref.dequantize_4bit(packed, absmax.float(), shape, blocksize, dtype)
    packed = packed.reshape(-1).contiguous()
    stats = {"qabsmax": qabsmax.to(torch.uint8).contiguous(), "state2": state2.float().contiguous(),
             "code2": code2.float().contiguous(), "offset": float(offset)} if double else \
        {"absmax": absmax.float().contiguous()}
    if name == "c":
        if double:
            stats["absmax2"] = stats.pop("state2")
        return cnf4.dequantize_4bit(packed, shape, blocksize, dtype, cnf4.library(), **stats)
    from lorafit.quant.triton.nf4_dequant import dequantize_4bit_triton

    return dequantize_4bit_triton(packed, shape, blocksize, dtype, ref.nf4_levels(packed.device), **stats)


def nf4_matmul(x: torch.Tensor, packed: torch.Tensor, shape: tuple[int, int], blocksize: int, *,
               absmax: torch.Tensor | None = None, qabsmax: torch.Tensor | None = None,
               state2: torch.Tensor | None = None, code2: torch.Tensor | None = None,
               offset: torch.Tensor | float | None = None, backend: str | None = None) -> torch.Tensor:
    """x (..., K) @ W^T for the NF4 weight W (N, K): the fused Triton kernel for few tokens on CUDA
    (decoding), else dequantize (through this dispatch) and a dense matmul."""
    tokens = x.numel() // max(x.shape[-1], 1)
    stats = dict(absmax=absmax, qabsmax=qabsmax, state2=state2, code2=code2, offset=offset)
    if tokens <= SMALL_M and choose(x.device, "matmul", backend) == "triton":
        from lorafit.quant.triton.nf4_matmul import nf4_matmul_triton

        double = qabsmax is not None
        kw = {"qabsmax": qabsmax.contiguous(), "state2": state2.float().contiguous(),
              "code2": code2.float().contiguous(), "offset": float(offset)} if double else \
            {"absmax": absmax.float().contiguous()}
        return nf4_matmul_triton(x, packed.reshape(-1).contiguous(), tuple(shape), blocksize,
                                 ref.nf4_levels(x.device), **kw)
    return F.linear(x, dequantize_4bit(packed, shape, blocksize, x.dtype, backend=backend, **stats))
