"""Chunked cross-entropy: same loss and gradients as F.cross_entropy on full logits, far less memory."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from lorafit.ops.chunked_loss import causal_lm_loss, chunked_cross_entropy


def _case(dtype: torch.dtype, bias: bool, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(3, 11, 32, generator=gen).to(dtype).requires_grad_(True)
    w = (torch.randn(97, 32, generator=gen) * 0.3).to(dtype).requires_grad_(True)
    b = (torch.randn(97, generator=gen) * 0.1).to(dtype).requires_grad_(True) if bias else None
    labels = torch.randint(0, 97, (3, 11), generator=gen)
    labels[0, :4] = -100  # a prompt that is not trained on
    labels[2, -3:] = -100  # padding
    return h, w, b, labels


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_matches_full_logits(reduction, bias, dtype, tol):
    h, w, b, labels = _case(dtype, bias)
    params = [h, w] + ([b] if bias else [])
    logits = F.linear(h, w, b)[:, :-1].float()  # the plain causal-LM path
    ref = F.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100, reduction=reduction)
    ref_grads = torch.autograd.grad(ref, params)
    got = causal_lm_loss(h, w, labels, bias=b, reduction=reduction, chunk_size=7)  # chunks straddle rows
    got_grads = torch.autograd.grad(got, params)
    assert abs(got.item() - ref.item()) <= tol * max(1.0, abs(ref.item()))
    for g, r in zip(got_grads, ref_grads):
        err = (g.float() - r.float()).abs().max().item() / r.float().abs().max().item()
        assert err <= tol, err


def test_frozen_head_and_all_ignored():
    h, w, _, labels = _case(torch.float32, False)
    w.requires_grad_(False)
    loss = chunked_cross_entropy(h, w, labels, reduction="sum", chunk_size=5)
    (gh,) = torch.autograd.grad(loss, [h])
    ref = F.cross_entropy(F.linear(h, w).flatten(0, 1), labels.flatten(), reduction="sum")
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gh, torch.autograd.grad(ref, [h])[0], rtol=1e-5, atol=1e-6)
    none = torch.full_like(labels, -100)
    assert chunked_cross_entropy(h, w, none, reduction="mean").item() == 0.0


_MEMORY_SCRIPT = textwrap.dedent("""
    import json, sys, torch, torch.nn.functional as F
    def hwm_kib():  # VmHWM: ru_maxrss would keep the peak of the pytest process we were forked from
        return int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0])
    from lorafit.ops.chunked_loss import causal_lm_loss
    torch.set_num_threads(2)
    B, T, H, V = 4, 512, 576, 49152
    g = torch.Generator().manual_seed(0)
    h = torch.randn(B, T, H, generator=g).requires_grad_(True)
    w = torch.randn(V, H, generator=g) * 0.02  # frozen head, as in LoRA training
    labels = torch.randint(0, V, (B, T), generator=g)
    F.linear(h[0, :8].detach(), w).sum()  # warm up the matmul so its workspaces are counted before
    before = hwm_kib()
    if sys.argv[1] == "plain":
        logits = F.linear(h, w)[:, :-1].float()
        loss = F.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), reduction="sum")
    else:
        loss = causal_lm_loss(h, w, labels, reduction="sum", chunk_size=512)
    loss.backward()
    after = hwm_kib()
    print(json.dumps({"peak_mb": (after - before) / 1024, "loss": loss.item()}))
""")


def _start(path: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _MEMORY_SCRIPT, path], stdout=subprocess.PIPE, text=True)


def _result(proc: subprocess.Popen) -> dict:
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0
    return json.loads(out.strip().splitlines()[-1])


def test_peak_memory_below_half_of_plain():
    """Vocab 49152, 4 x 512 tokens, hidden 576 (SmolLM2 shape): loss + backward, each path in a fresh
    process (both run at once; each measures only its own RSS), peak RSS growth over the step."""
    procs = {path: _start(path) for path in ("plain", "chunked")}
    plain, chunked = _result(procs["plain"]), _result(procs["chunked"])
    assert abs(plain["loss"] - chunked["loss"]) <= 1e-5 * plain["loss"]
    print(f"peak RSS growth: plain {plain['peak_mb']:.0f} MB, chunked {chunked['peak_mb']:.0f} MB")
    assert chunked["peak_mb"] < 0.5 * plain["peak_mb"], (plain, chunked)
