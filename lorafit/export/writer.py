"""Tensor encodings and the GGUF file writer: streamed, with a progress bar, atomic.

GGUF (llama.cpp's file format, https://github.com/ggml-org/ggml/blob/master/docs/gguf.md) is a
header, key/value metadata, a table of tensor infos (name, shape, ggml type, offset), then the
tensor data, each tensor aligned to 32 bytes. gguf-py's `GGUFWriter` writes the header, the
metadata and the table; this module declares every tensor first (`Planned`: its name, shape, type
and byte size), then encodes and writes them one at a time, so at most one encoded tensor exists
besides the model. The file is written under a temporary name next to the target and renamed
at the end: an interrupted export never leaves a half file under the final name.

Shapes here are PyTorch/numpy order, (rows, cols) = (out, in); GGUF stores dimensions reversed
(ne[0] = in is the contiguous one), which `GGUFWriter` does. Block formats work along rows:

    type   block   bytes/block   what a block holds
    f32    1       4             the value
    f16    1       2             IEEE half
    bf16   1       2             the top 16 bits of the f32 (rounded to nearest even)
    q8_0   32      34            f16 scale d, 32 x int8 q;      x = d * q
    q4_0   32      18            f16 scale d, 16 bytes of nibbles; x = d * (q - 8)

Norm weights, biases and other 1-D tensors stay f32 (llama.cpp expects them so), and a matrix
whose rows are not a whole number of blocks falls back to f16, as llama.cpp's converter does.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter, LlamaFileType
from gguf import quants as gguf_quants
from tqdm.auto import tqdm

from lorafit.errors import LorafitError
from lorafit.paths import new_file_mode

Q = GGMLQuantizationType
# --outtype -> (ggml type of the matrices, general.file_type)
OUTTYPES: dict[str, tuple[GGMLQuantizationType, LlamaFileType]] = {
    "f32": (Q.F32, LlamaFileType.ALL_F32),
    "f16": (Q.F16, LlamaFileType.MOSTLY_F16),
    "bf16": (Q.BF16, LlamaFileType.MOSTLY_BF16),
    "q8_0": (Q.Q8_0, LlamaFileType.MOSTLY_Q8_0),
    "q4_0": (Q.Q4_0, LlamaFileType.MOSTLY_Q4_0),
}


def check_outtype(outtype: str, allowed: Iterable[str] = OUTTYPES) -> None:
    allowed = list(allowed)
    if outtype not in allowed:
        raise LorafitError(f"--outtype {outtype}: unknown; use one of {', '.join(allowed)}")


def tensor_type(shape: tuple[int, ...], outtype: str, keep_f32: bool = False) -> GGMLQuantizationType:
    """The ggml type one tensor is stored in for `outtype` (see the module docstring)."""
    if keep_f32 or len(shape) < 2:
        return Q.F32
    qtype = OUTTYPES[outtype][0]
    block, _ = GGML_QUANT_SIZES[qtype]
    return qtype if shape[-1] % block == 0 else Q.F16


def nbytes(shape: tuple[int, ...], qtype: GGMLQuantizationType) -> int:
    block, size = GGML_QUANT_SIZES[qtype]
    n = 1
    for d in shape:
        n *= d
    return n // block * size


def encode(tensor: torch.Tensor, qtype: GGMLQuantizationType) -> np.ndarray:
    """The bytes of `tensor` in ggml type `qtype`, as a numpy array (any dtype; only bytes count)."""
    t = tensor.detach().to("cpu", torch.float32).contiguous()
    if qtype == Q.F32:
        return t.numpy()
    if qtype == Q.F16:
        return t.to(torch.float16).numpy()
    if qtype == Q.BF16:  # torch rounds to nearest even, as ggml does
        return t.to(torch.bfloat16).view(torch.int16).numpy()
    return gguf_quants.quantize(t.numpy(), qtype)


@dataclass
class Planned:
    """One tensor of the file: declared up front, produced (as fp32 torch) only when written."""

    name: str
    shape: tuple[int, ...]  # numpy order, (out, in) for matrices
    qtype: GGMLQuantizationType
    produce: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        return nbytes(self.shape, self.qtype)


def check_out_path(out: str | os.PathLike, overwrite: bool) -> Path:
    """The output file's path, after the checks a user can act on (folder exists, no clobbering)."""
    out = Path(out)
    if not out.parent.is_dir():
        raise LorafitError(f"--out {out}: the folder {out.parent} does not exist; create it or choose another --out")
    if out.is_dir():
        raise LorafitError(f"--out {out}: is a folder; give a file name such as {out / 'model.gguf'}")
    if out.exists() and not overwrite:
        raise LorafitError(f"--out {out}: exists; choose another --out or pass --overwrite")
    return out


def write_gguf(out: str | os.PathLike, arch: str, metadata: Callable[[GGUFWriter], None],
               tensors: list[Planned], desc: str = "writing") -> Path:
    """Write a GGUF file: `metadata(writer)` adds the key/values, then the tensors are encoded and
    written in order with a progress bar. Atomic: a temporary file in the same folder, renamed."""
    out = Path(out)
    fd, tmp_name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    writer = GGUFWriter(tmp, arch)
    try:
        metadata(writer)
        for t in tensors:
            writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes,
                                   raw_dtype=None if t.qtype == Q.F32 else t.qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        with tqdm(total=sum(t.nbytes for t in tensors), unit="B", unit_scale=True, desc=desc) as bar:
            for t in tensors:
                data = t.produce()
                if tuple(data.shape) != t.shape:
                    raise AssertionError(f"{t.name}: produced {tuple(data.shape)}, declared {t.shape}")
                writer.write_tensor_data(encode(data, t.qtype))
                bar.update(t.nbytes)
        writer.close()
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        tmp.chmod(new_file_mode())  # the umask's permissions, not mkstemp's private 0600
        os.replace(tmp, out)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return out
