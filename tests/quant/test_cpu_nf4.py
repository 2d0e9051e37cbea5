"""The NF4 C kernel (lorafit/quant/cpu) against the PyTorch reference in lorafit/quant/reference.py.

Every vector path is checked on this machine by compiling the kernel for several -march levels
(AVX-512 where the CPU has it, AVX2, and plain x86-64 for the scalar code); a level the compiler or
CPU cannot do is skipped. Equality is exact: same bytes, and dequantized tensors equal bit for bit.
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from lorafit.errors import LorafitError
from lorafit.quant.cpu import build
from lorafit.quant.cpu import nf4 as cnf4
from lorafit.quant.nf4 import STATS_BLOCKSIZE, VALID_BLOCKSIZES, quantize_blockwise_8bit, quantize_nf4
from lorafit.quant.reference import dynamic_lut

ARCHES = [build.NATIVE, "-march=x86-64-v3", "-march=x86-64"]


@pytest.fixture(scope="module", params=ARCHES)
def lib(request):
    lib = cnf4.load(request.param)
    if lib is None:
        pytest.skip(f"cannot build the kernel with {request.param} here")
    if request.param != build.NATIVE:  # only run code this CPU supports
        native = cnf4.load(build.NATIVE)
        if native is None or lib.lf_simd_level() > native.lf_simd_level():
            pytest.skip(f"{request.param} needs instructions this CPU lacks")
    return lib


def _weights(numel: int, seed: int = 0, zero_blocks: bool = False, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(numel, generator=g) * 0.05
    if zero_blocks:
        w[:64] = 0.0  # a zero block at the start for every block size ...
        w[-(numel % 64 or 64):] = 0.0  # ... and a zero (possibly partial) block at the end
        w[200:264] = 1.0  # and a constant run
    return w.to(dtype)


def _check_quantize(lib, w: torch.Tensor, blocksize: int) -> None:
    ref = quantize_nf4(w, blocksize, double_quant=False, backend="torch")
    packed, absmax = cnf4.quantize_4bit(w.reshape(-1).float().contiguous(), blocksize, lib)
    assert torch.equal(packed, ref.packed)
    assert torch.equal(absmax, ref.absmax)
    offset = absmax.mean()
    codes, absmax2 = cnf4.quantize_stats(absmax, offset.item(), dynamic_lut(torch.device("cpu")),
                                         STATS_BLOCKSIZE, lib)
    ref_codes, ref_absmax2 = quantize_blockwise_8bit(absmax - offset, STATS_BLOCKSIZE)
    assert torch.equal(codes, ref_codes)
    assert torch.equal(absmax2, ref_absmax2)


def _check_dequantize(lib, w: torch.Tensor, blocksize: int, double_quant: bool) -> None:
    t = quantize_nf4(w, blocksize, double_quant=double_quant, backend="torch")
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        ref = t.dequantize(dtype, backend="torch")
        if double_quant:
            got = cnf4.dequantize_4bit(t.packed, t.shape, blocksize, dtype, lib, qabsmax=t.absmax, code2=t.code2,
                                       absmax2=t.state2, offset=t.offset.item())
        else:
            got = cnf4.dequantize_4bit(t.packed, t.shape, blocksize, dtype, lib, absmax=t.absmax)
        assert got.dtype == dtype and got.shape == ref.shape
        assert torch.equal(got, ref), dtype


# 64*256 = one full statistics block of 64-blocks; the sizes around it leave partial blocks at both levels.
SIZES = [1, 7, 15, 64, 65, 1000, 3 * 5, 129 * 257, 64 * 256 + 64 * 3 + 17, 2 * 64 * 256]


@pytest.mark.parametrize("numel", SIZES)
@pytest.mark.parametrize("blocksize", VALID_BLOCKSIZES)
def test_quantize_matches_reference(lib, numel, blocksize):
    _check_quantize(lib, _weights(numel, seed=numel), blocksize)


@pytest.mark.parametrize("numel", SIZES)
@pytest.mark.parametrize("blocksize", [32, 64, 4096])
@pytest.mark.parametrize("double_quant", [True, False])
def test_dequantize_matches_reference(lib, numel, blocksize, double_quant):
    _check_dequantize(lib, _weights(numel, seed=numel), blocksize, double_quant)


@pytest.mark.parametrize("numel", [64 * 8, 1001, 64 * 256 + 31])
@pytest.mark.parametrize("blocksize", [32, 64, 2048])
def test_zero_and_constant_blocks(lib, numel, blocksize):
    w = _weights(numel, zero_blocks=True)
    _check_quantize(lib, w, blocksize)
    _check_dequantize(lib, w, blocksize, double_quant=True)
    _check_quantize(lib, torch.zeros(numel), blocksize)  # every block 0, the statistics absmax too
    _check_dequantize(lib, torch.zeros(numel), blocksize, double_quant=True)


@pytest.mark.parametrize("blocksize", [32, 64, 256])
def test_nan_and_inf_follow_reference(lib, blocksize):
    """Broken weights behave as in torch: NaN propagates into the absmax (code 15), inf zeroes its block."""
    w = _weights(64 * 40 + 9, seed=5)
    w[3], w[600], w[-2] = float("nan"), float("inf"), float("nan")  # -2: inside the partial last block
    w[1000] = -float("inf")
    ref = quantize_nf4(w, blocksize, double_quant=False, backend="torch")
    packed, absmax = cnf4.quantize_4bit(w, blocksize, lib)
    assert torch.equal(packed, ref.packed)
    assert torch.allclose(absmax, ref.absmax, rtol=0, atol=0, equal_nan=True)
    for dtype in (torch.float32, torch.bfloat16):
        got = cnf4.dequantize_4bit(packed, ref.shape, blocksize, dtype, lib, absmax=absmax)
        want = ref.dequantize(dtype, backend="torch")
        assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got[~got.isnan()], want[~want.isnan()])
    codes, absmax2 = cnf4.quantize_stats(absmax, float("nan"), dynamic_lut(torch.device("cpu")), STATS_BLOCKSIZE, lib)
    assert codes.eq(0).all() and absmax2.isnan().all()  # the reference would index out of range here


def test_threads_split_on_block_boundaries(lib, monkeypatch):
    """Three threads taking ~10 chunks of an odd count: the last chunk is short, the last block partial."""
    monkeypatch.setattr(cnf4, "_threads", lambda numel: 3)
    w = _weights(64 * 5001 + 33, seed=3)
    for blocksize in (32, 64, 256):
        _check_quantize(lib, w, blocksize)
        _check_dequantize(lib, w, blocksize, double_quant=True)


def test_public_api_uses_kernel_and_matches():
    """quantize_nf4 / NF4Tensor.dequantize with backend c vs torch, including bf16 and fp16 weights."""
    if cnf4.library() is None:
        pytest.skip("the C kernel is unavailable here")
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        w = _weights(300 * 777, seed=1, zero_blocks=True, dtype=dtype).view(300, 777)
        a, b = quantize_nf4(w, backend="torch"), quantize_nf4(w, backend="c")
        for field in ("packed", "absmax", "state2", "code2", "offset"):
            assert torch.equal(getattr(a, field), getattr(b, field)), field
        assert b.shape == w.shape and b.dtype == dtype
        assert torch.equal(b.dequantize(dtype, backend="c"), a.dequantize(dtype, backend="torch"))


def test_large_output_matches_reference():
    """A >= 32 MiB output (the kernel asks for huge pages there) split over threads."""
    if cnf4.library() is None:
        pytest.skip("the C kernel is unavailable here")
    t = quantize_nf4(_weights((8 << 20) + 33, seed=2), backend="c")
    assert torch.equal(t.dequantize(backend="c"), t.dequantize(backend="torch"))


def test_undersized_tensors_are_refused():
    lib = cnf4.library()
    if lib is None:
        pytest.skip("the C kernel is unavailable here")
    t = quantize_nf4(torch.randn(64, 64), double_quant=False)
    with pytest.raises(LorafitError):
        cnf4.dequantize_4bit(t.packed[:-1], t.shape, 64, torch.float32, lib, absmax=t.absmax)


def test_unknown_backend_raises():
    with pytest.raises(LorafitError):
        quantize_nf4(torch.randn(64), backend="cuda")


def _run(code: str, **env: str) -> str:
    full_env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), **env}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=full_env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


FALLBACK_CHECK = """
    import torch
    from lorafit.errors import LorafitError
    from lorafit.quant import backend
    from lorafit.quant.cpu import nf4 as cnf4
    from lorafit.quant.nf4 import quantize_nf4
    assert cnf4.library() is None and backend.describe("cpu") == "pytorch reference"
    w = torch.randn(129, 257)
    t = quantize_nf4(w)
    assert torch.equal(t.packed, quantize_nf4(w, backend="torch").packed)
    assert torch.equal(t.dequantize(), t.dequantize(backend="torch"))
    try:
        quantize_nf4(w, backend="c")
        raise SystemExit("backend='c' should raise without the kernel")
    except LorafitError:
        pass
    print("fallback ok")
"""


PINNED_CHECK = """
    import torch
    from lorafit.quant import backend
    from lorafit.quant.nf4 import quantize_nf4
    assert backend.current_backend() == "torch" and backend.choose(torch.device("cpu"), "dequantize") == "torch"
    w = torch.randn(129, 257)
    t = quantize_nf4(w)
    assert torch.equal(t.packed, quantize_nf4(w, backend="c").packed)
    assert torch.equal(t.dequantize(), t.dequantize(backend="c"))
    print("pinned ok")
"""


def test_backend_pinned_by_env_runs_the_reference(tmp_path):
    assert "pinned ok" in _run(PINNED_CHECK, LORAFIT_NF4_BACKEND="torch", LORAFIT_CACHE=str(tmp_path))


def test_missing_compiler_falls_back_to_torch(tmp_path):
    out = _run(FALLBACK_CHECK, CC=str(tmp_path / "no-such-cc"), LORAFIT_CACHE=str(tmp_path))
    assert "fallback ok" in out
    assert not list((tmp_path / "ckernels").glob("*.so"))


def test_concurrent_first_build_is_safe(tmp_path):
    """Two processes compiling into an empty cache at once both load a complete library."""
    code = """
        from lorafit.quant.cpu import nf4 as cnf4
        lib = cnf4.library()
        assert lib is not None and lib.lf_simd_level() >= 0
        print("built")
    """
    if build.compiler() is None:
        pytest.skip("no C compiler")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "LORAFIT_CACHE": str(tmp_path)}
    env.pop("LORAFIT_NF4_BACKEND", None)
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0 and "built" in out, err
    files = sorted(p.name for p in (tmp_path / "ckernels").iterdir())
    assert len(files) == 1 and files[0].startswith("nf4-") and files[0].endswith(".so"), files  # no temp files
