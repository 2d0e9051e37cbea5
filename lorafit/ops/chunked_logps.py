"""Per-token log-probabilities straight from the final hidden states, a chunk of tokens at a time.

Preference and RL objectives need log p(token) of every scored token, not one summed loss, so the
chunked cross-entropy (`lorafit.ops.chunked_loss`) is not enough; but the (N, V) logits must still
never exist at once. For token n with hidden state h_n (H,), head W (V, H) (optional bias c) and
target t_n:

    y_n = W h_n + c                        raw logits (computed in h's dtype, upcast to fp32)
    z_n = s * y_n                          logit scale s (1 for most models)
    z_n = k * tanh(s * y_n / k)            with final-logit soft-capping k (Gemma 2)
    z_n = z_n / T                          sampling temperature T (GRPO scores tokens as they were sampled)
    lse_n = log sum_v exp(z_nv),   p_n = softmax(z_n)
    logp_n = z_n[t_n] - lse_n

and three statistics for logging (no gradient), as TRL 1.16 computes them:

    mean logit   sum_v z_nv / V
    entropy      lse_n - sum_v p_nv z_nv
    top-1        argmax_v z_nv == t_n  (the first maximum)

Gradients, with g_n = dL/dlogp_n the upstream gradient of token n:

    dL/dy_n = g_n (onehot(t_n) - p_n) * dz/dy,     dz/dy = s (1 - tanh^2) / T   (= s / T without soft-capping)
    dL/dh_n = W^T dL/dy_n = g_n d_n,               d_n = W^T [(onehot(t_n) - p_n) * dz/dy]
    dL/dW   = sum_n dL/dy_n h_n^T,                 dL/dc = sum_n dL/dy_n

d_n does not depend on g_n, so when only the hidden states need a gradient (a frozen head: every
adapter run) forward stores d (N, H) and backward scales each row by its g_n: two head matmuls per
chunk, nothing of size V kept. When the head trains (`method: full`), backward recomputes each chunk's
logits instead. Under `torch.no_grad` (a reference forward) only the log-probabilities are computed.
"""

from __future__ import annotations

import torch

from lorafit.ops.chunked_loss import chunk_logits
from lorafit.ops.loss_chunk import default_chunk_size

__all__ = ["ChunkedLogProbFunction", "chunked_logps"]


def _transform(z: torch.Tensor, scale: float, softcap: float | None, inv_t: float = 1.0) -> torch.Tensor | None:
    """Apply the logit scale, soft-capping and 1 / temperature to fp32 logits in place; returns the
    soft-capping's slope (1 - tanh^2) when soft-capping (None otherwise: dz/dy is the constant s / T)."""
    if scale != 1.0:
        z.mul_(scale)
    slope = None
    if softcap is not None:
        t = z.div_(softcap).tanh_()  # (C, V), in place: z is now tanh
        slope = 1 - t * t  # (C, V)
        t.mul_(softcap)
    if inv_t != 1.0:
        z.mul_(inv_t)
    return slope


class ChunkedLogProbFunction(torch.autograd.Function):
    """(logp, mean logit, entropy, top-1) per token of `hidden @ weight^T (+ bias)` against `targets`,
    chunked (see the module docstring). Only logp is differentiable; the statistics are None unless
    `stats`. `need` says which of (hidden, weight, bias) want a gradient."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor, chunk_size: int, scale: float, softcap: float | None,
                need: tuple[bool, bool, bool], stats: bool, inv_t: float = 1.0):
        # hidden (N, H), weight (V, H), bias (V,) or None, targets (N,) long, all targets valid
        need_h, need_w, need_b = need
        n, vocab = hidden.shape[0], weight.shape[0]
        w = weight.to(hidden.dtype)
        b = None if bias is None else bias.to(hidden.dtype)
        f32 = dict(dtype=torch.float32, device=hidden.device)
        logp = torch.empty(n, **f32)
        mean = torch.empty(n, **f32) if stats else None
        entropy = torch.empty(n, **f32) if stats else None
        top1 = torch.empty(n, dtype=torch.bool, device=hidden.device) if stats else None
        recompute = need_w or need_b  # the head trains: backward recomputes the chunks
        direction = torch.empty_like(hidden) if need_h and not recompute else None  # (N, H)
        buffer = torch.empty(min(chunk_size, n), vocab, **f32)
        for start in range(0, n, chunk_size):
            sl = slice(start, start + chunk_size)
            h, t = hidden[sl], targets[sl]
            rows = torch.arange(t.shape[0], device=t.device)
            z = chunk_logits(h, w, b, buffer[: h.shape[0]])  # (C, V) fp32
            slope = _transform(z, scale, softcap, inv_t)
            if stats:
                mean[sl] = z.sum(dim=1) / vocab
                top1[sl] = z.argmax(dim=1) == t
            target_logit = z[rows, t]  # (C,)
            zmax = z.amax(dim=1)  # (C,)
            zmax.masked_fill_(zmax.isinf(), 0.0)
            e = torch.exp(z - zmax[:, None]) if stats else z.sub_(zmax[:, None]).exp_()  # (C, V) unnormalized
            sumexp = e.sum(dim=1)
            lse = zmax + sumexp.log()
            logp[sl] = target_logit - lse
            if stats:
                entropy[sl] = lse - (e * z).sum(dim=1) / sumexp
            if direction is None:
                continue
            dz = e.div_(sumexp[:, None]).neg_()  # -p
            dz[rows, t] += 1.0  # onehot - p
            if slope is not None:
                dz.mul_(slope)
            if scale * inv_t != 1.0:
                dz.mul_(scale * inv_t)
            direction[sl] = (dz.to(w.dtype) @ w).to(hidden.dtype)  # (C, H)
        ctx.chunk, ctx.scale, ctx.softcap, ctx.need, ctx.recompute = chunk_size, scale, softcap, need, recompute
        ctx.inv_t = inv_t
        ctx.direction = direction
        if recompute:
            ctx.save_for_backward(hidden, weight, bias, targets)
        ctx.mark_non_differentiable(*[x for x in (mean, entropy, top1) if x is not None])
        return logp, mean, entropy, top1

    @staticmethod
    def backward(ctx, grad_logp: torch.Tensor, *_):
        need_h, need_w, need_b = ctx.need
        if grad_logp is None:
            return (None,) * 10
        if not ctx.recompute:
            grad_h = None
            if ctx.direction is not None:
                grad_h = ctx.direction * grad_logp[:, None].to(ctx.direction.dtype)  # (N, H)
            ctx.direction = None
            return (grad_h, None, None, None, None, None, None, None, None, None)
        hidden, weight, bias, targets = ctx.saved_tensors
        w = weight.to(hidden.dtype)
        b = None if bias is None else bias.to(hidden.dtype)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if need_b else None
        n, chunk = hidden.shape[0], ctx.chunk
        buffer = torch.empty(min(chunk, n), weight.shape[0], dtype=torch.float32, device=hidden.device)
        for start in range(0, n, chunk):
            sl = slice(start, start + chunk)
            h, t, g = hidden[sl], targets[sl], grad_logp[sl].float()
            rows = torch.arange(t.shape[0], device=t.device)
            z = chunk_logits(h, w, b, buffer[: h.shape[0]])
            slope = _transform(z, ctx.scale, ctx.softcap, ctx.inv_t)
            zmax = z.amax(dim=1, keepdim=True)
            zmax.masked_fill_(zmax.isinf(), 0.0)
            e = z.sub_(zmax).exp_()
            dz = e.div_(e.sum(dim=1, keepdim=True)).neg_()  # -p
            dz[rows, t] += 1.0
            if slope is not None:
                dz.mul_(slope)
            dz.mul_((g * (ctx.scale * ctx.inv_t))[:, None])  # dL/dy (C, V)
            if need_h:
                grad_h[sl] = (dz.to(w.dtype) @ w).to(hidden.dtype)
            if need_w:
                grad_w.addmm_(dz.t(), h.float())
            if need_b:
                grad_b += dz.sum(0)
        grad_w = None if grad_w is None else grad_w.to(weight.dtype)
        grad_b = None if grad_b is None else grad_b.to(bias.dtype)
        return (grad_h, grad_w, grad_b, None, None, None, None, None, None, None)


def chunked_logps(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                  bias: torch.Tensor | None = None, scale: float = 1.0, softcap: float | None = None,
                  stats: bool = False, chunk_size: int | None = None, temperature: float = 1.0):
    """Per-token log-probabilities of `targets` (N,) under `hidden (N, H) @ weight^T (+ bias)`, every
    target a real token id (drop ignored positions before calling). Returns (logp, mean_logit, entropy,
    top1), each (N,); the last three None unless `stats`. Equals
    `F.log_softmax(transform(F.linear(hidden, weight, bias).float()) / temperature, -1).gather(-1, targets[:, None])`."""
    chunk = int(chunk_size) if chunk_size else default_chunk_size(weight.shape[0])
    grad_on = torch.is_grad_enabled()
    need = tuple(grad_on and x is not None and x.requires_grad for x in (hidden, weight, bias))
    if hidden.shape[0] == 0:  # nothing scored: an empty result still connected to the graph
        empty = hidden.sum(dim=-1).float()
        none = torch.empty(0, device=hidden.device)
        return empty, *((none, none, none.bool()) if stats else (None, None, None))
    return ChunkedLogProbFunction.apply(hidden, weight, bias, targets, chunk, float(scale), softcap, need, stats,
                                        1.0 / float(temperature))
