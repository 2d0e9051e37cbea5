"""Which device and dtype a run uses, chosen automatically, and getting batches onto that device.

    device "auto"  -> the first CUDA GPU when there is one, else the CPU
    dtype  "auto"  -> bfloat16 on a GPU that has it (float16 on older ones), float32 on the CPU

The dtype is the compute dtype of the frozen base (and of the weights that are not quantized);
adapters keep fp32 master weights whatever it is. Nothing else in lorafit decides where tensors go:
models report their device (`model_device`) and everything follows it, so the same code runs on a
CPU, a GPU or the `meta` device.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from lorafit.errors import LorafitError

DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N", "meta")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_CHOICES = ("auto", *DTYPES)


def parse_device(spec: str | torch.device | None) -> torch.device | None:
    """The device `spec` names (None for "auto"), checked for spelling only: whether it is there is
    `resolve_device`'s question. A misspelled name is a LorafitError naming --device."""
    if isinstance(spec, torch.device):
        return spec
    if spec in (None, "", "auto"):
        return None
    try:
        return torch.device(spec)
    except (RuntimeError, TypeError):
        raise LorafitError(f"device {spec!r} is not a device name; use --device "
                           f"{', '.join(DEVICE_CHOICES)}") from None


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """"auto" (or None) -> cuda when available else cpu; any other name is checked and returned."""
    device = parse_device(spec)
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise LorafitError(f"device {spec!r}: no CUDA GPU is visible to PyTorch here (torch "
                               f"{torch.__version__}); use --device cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise LorafitError(f"device {spec!r}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    return device


def parse_dtype(spec: str | torch.dtype | None) -> torch.dtype | None:
    """The dtype `spec` names (None for "auto"); an unknown name is a LorafitError naming --dtype."""
    if isinstance(spec, torch.dtype):
        return spec
    if spec in (None, "", "auto"):
        return None
    if spec not in DTYPES:
        raise LorafitError(f"dtype {spec!r} is unknown; use --dtype {', '.join(DTYPE_CHOICES)}")
    return DTYPES[spec]


def resolve_dtype(spec: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """"auto" (or None) -> bf16 on CUDA with bf16 support, fp16 on older GPUs, fp32 elsewhere."""
    dtype = parse_dtype(spec)
    if dtype is not None:
        return dtype
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def model_device(model: nn.Module) -> torch.device:
    """Where a model's weights live (its first parameter or buffer; the CPU for an empty module)."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The batch's tensors on `device`. Host-to-GPU copies go through pinned memory and do not block,
    so the copy of the next batch overlaps the GPU still working on the previous step."""
    if all(t.device == device for t in batch.values()):
        return batch
    if device.type != "cuda":
        return {k: t.to(device) for k, t in batch.items()}
    return {k: (t.pin_memory() if t.device.type == "cpu" else t).to(device, non_blocking=True)
            for k, t in batch.items()}


@functools.cache
def triton_available() -> bool:
    """Whether triton can be imported (every CUDA kernel of lorafit falls back to PyTorch without it)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
