"""Chunked per-token log-probabilities: the values, statistics and gradients of full-logits log_softmax."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lorafit.ops.chunked_logps import chunked_logps


def _reference(h, w, b, t, scale, softcap, temperature=1.0):
    z = F.linear(h, w, b).float() * scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    z = z / temperature
    logp = F.log_softmax(z, -1)
    p = logp.exp()
    return (logp.gather(-1, t[:, None]).squeeze(1), z.mean(-1), -(p * logp).sum(-1), z.argmax(-1) == t)


def _case(dtype, bias, seed=0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(23, 32, generator=gen).to(dtype).requires_grad_(True)
    w = (torch.randn(97, 32, generator=gen) * 0.3).to(dtype).requires_grad_(True)
    b = (torch.randn(97, generator=gen) * 0.1).to(dtype).requires_grad_(True) if bias else None
    t = torch.randint(0, 97, (23,), generator=gen)
    g = torch.randn(23, generator=gen)  # a different upstream gradient per token
    return h, w, b, t, g


@pytest.mark.parametrize("head_trains", [False, True])
@pytest.mark.parametrize("scale,softcap,temperature", [(1.0, None, 1.0), (0.5, None, 1.0), (1.0, 3.0, 1.0),
                                                       (1.0, None, 0.7), (0.5, 3.0, 1.3)])
@pytest.mark.parametrize("bias", [False, True])
def test_values_statistics_and_gradients_equal_full_logits(head_trains, scale, softcap, temperature, bias):
    h, w, b, t, g = _case(torch.float32, bias)
    if not head_trains:
        w.requires_grad_(False)
        if b is not None:
            b.requires_grad_(False)
    params = [x for x in (h, w, b) if x is not None and x.requires_grad]
    ref = _reference(h, w, b, t, scale, softcap, temperature)
    ref_grads = torch.autograd.grad((ref[0] * g).sum(), params)
    got = chunked_logps(h, w, t, bias=b, scale=scale, softcap=softcap, stats=True, chunk_size=5,
                        temperature=temperature)
    got_grads = torch.autograd.grad((got[0] * g).sum(), params)
    for x, r in zip(got[:3], ref[:3]):
        torch.testing.assert_close(x, r, rtol=1e-5, atol=1e-5)
    assert torch.equal(got[3], ref[3])
    for x, r in zip(got_grads, ref_grads):
        torch.testing.assert_close(x, r, rtol=1e-4, atol=1e-6)


def test_bf16_hidden_states_and_no_grad():
    h, w, _, t, g = _case(torch.bfloat16, False)
    w.requires_grad_(False)
    ref = _reference(h.float(), w.float(), None, t, 1.0, None)[0]
    got = chunked_logps(h, w, t, chunk_size=7)[0]
    (gh,) = torch.autograd.grad((got * g).sum(), [h])
    (rh,) = torch.autograd.grad((_reference(h, w, None, t, 1.0, None)[0] * g).sum(), [h])
    assert (got - ref).abs().max() < 0.05 and gh.dtype == torch.bfloat16
    assert (gh.float() - rh.float()).abs().max() / rh.float().abs().max() < 0.02
    with torch.no_grad():
        logp, mean, entropy, top1 = chunked_logps(h, w, t)
    assert not logp.requires_grad and mean is None and entropy is None and top1 is None


def test_nothing_scored_is_an_empty_result_still_in_the_graph():
    h, w, _, _, _ = _case(torch.float32, False)
    logp = chunked_logps(h[:0], w, torch.zeros(0, dtype=torch.long))[0]
    assert logp.shape == (0,) and logp.requires_grad
    (gh,) = torch.autograd.grad(logp.sum(), [h])
    assert torch.count_nonzero(gh) == 0
