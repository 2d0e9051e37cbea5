"""The GGUF writer: encodings as ggml defines them, the per-tensor type rules, and atomic output."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader
from gguf import quants as gguf_quants

from lorafit.errors import LorafitError
from lorafit.export.writer import Planned, check_out_path, encode, tensor_type, write_gguf

Q = GGMLQuantizationType


def test_bf16_rounding_is_ggmls():
    """Our bf16 bytes (torch's round-to-nearest-even) equal gguf-py's port of ggml_compute_fp32_to_bf16."""
    x = torch.randn(64, 96) * torch.logspace(-8, 8, 96)
    ours = encode(x, Q.BF16).view(np.uint8).reshape(64, -1)
    assert np.array_equal(ours, gguf_quants.quantize(x.numpy(), Q.BF16))


@pytest.mark.parametrize("qtype, tol", [(Q.F16, 1e-3), (Q.Q8_0, 1 / 127), (Q.Q4_0, 1 / 7)])
def test_encodings_decode_to_the_values(qtype, tol):
    x = torch.randn(8, 64)
    back = gguf_quants.dequantize(encode(x, qtype).view(np.uint8).reshape(8, -1), qtype)
    blocks = x.reshape(8, 2, 32).abs().amax(-1, keepdim=True).expand(8, 2, 32).reshape(8, 64)  # each block's max
    assert (np.abs(back - x.numpy()) <= tol * blocks.numpy() + 1e-6).all()


def test_tensor_type_rules():
    assert tensor_type((576,), "q8_0") == Q.F32  # norms and biases stay f32
    assert tensor_type((1536, 576), "q8_0") == Q.Q8_0
    assert tensor_type((10, 48), "q4_0") == Q.F16  # rows of 48 are not whole 32-blocks
    assert tensor_type((10, 64), "f32") == Q.F32
    assert tensor_type((32,), "f16", keep_f32=True) == Q.F32


def test_written_file_reads_back(tmp_path):
    a, b = torch.randn(4, 64), torch.randn(7)
    out = write_gguf(tmp_path / "x.gguf", "llama", lambda w: w.add_string("general.name", "t"),
                     [Planned("a.weight", (4, 64), Q.Q8_0, lambda: a), Planned("b.weight", (7,), Q.F32, lambda: b)])
    reader = GGUFReader(out)
    got = {t.name: t for t in reader.tensors}
    assert got["a.weight"].tensor_type == Q.Q8_0 and list(got["a.weight"].shape) == [64, 4]  # ggml order
    assert np.array_equal(np.asarray(got["b.weight"].data), b.numpy())
    assert [p.name for p in tmp_path.iterdir()] == ["x.gguf"]


def test_an_interrupted_write_leaves_no_file(tmp_path):
    (tmp_path / "keep.gguf").write_bytes(b"old")

    def boom():
        raise KeyboardInterrupt

    tensors = [Planned("a.weight", (4, 64), Q.F16, lambda: torch.zeros(4, 64)), Planned("b.weight", (4, 64), Q.F16, boom)]
    for name in ("new.gguf", "keep.gguf"):
        with pytest.raises(KeyboardInterrupt):
            write_gguf(tmp_path / name, "llama", lambda w: None, tensors)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.gguf"]  # no half file, no temp, the old one intact
    assert (tmp_path / "keep.gguf").read_bytes() == b"old"


def test_out_path_checks(tmp_path):
    with pytest.raises(LorafitError, match="does not exist"):
        check_out_path(tmp_path / "missing" / "m.gguf", overwrite=False)
    (tmp_path / "m.gguf").write_bytes(b"")
    with pytest.raises(LorafitError, match="--overwrite"):
        check_out_path(tmp_path / "m.gguf", overwrite=False)
    assert check_out_path(tmp_path / "m.gguf", overwrite=True) == tmp_path / "m.gguf"
    with pytest.raises(LorafitError, match="is a folder"):
        check_out_path(tmp_path, overwrite=True)
