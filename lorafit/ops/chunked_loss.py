"""Causal-LM cross-entropy straight from the final hidden states, a chunk of tokens at a time.

The plain path materializes the (N, V) logits, their fp32 copy and, in backward, an (N, V) gradient:
for N = 2048 tokens and a 49152-token vocabulary that is 400 MB per buffer. Here the output head is
applied to C tokens at a time, so at most one (C, V) fp32 block lives at once, forward and backward.

For token n with hidden state h_n (H,), head W (V, H) (optional bias c (V,)) and target t_n:

    z_n = W h_n + c                      logits (fp32)
    lse_n = log Σ_v exp(z_nv)
    loss_n = lse_n - z_n[t_n]            (0 for t_n = ignore_index)
    L = Σ_n loss_n  (reduction "sum")    or  L / #{n : t_n != ignore_index}  ("mean")

Backward, with p_n = softmax(z_n) = exp(z_n - lse_n) and G = dL/dL_reduced (/ count for "mean"):

    dL/dz_n = G (p_n - onehot(t_n))      (0 for ignored tokens)
    dL/dh_n = W^T dL/dz_n                (N, H)
    dL/dW   = Σ_n dL/dz_n h_n^T          (V, H), only when the head is trainable
    dL/dc   = Σ_n dL/dz_n

Forward keeps only lse (N,) fp32; backward recomputes each chunk's logits from h and W (one extra
(C, H) x (H, V) matmul per chunk), so the saved state is h, W, targets and lse. The logits are
computed in the hidden states' dtype and upcast to fp32, as `F.cross_entropy(logits.float())` does
on the plain path.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


class ChunkedCrossEntropyFunction(torch.autograd.Function):
    """Sum of per-token cross-entropies of `hidden @ weight^T (+ bias)` against `targets`, chunked."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor, chunk_size: int, ignore_index: int) -> torch.Tensor:
        # hidden (N, H), weight (V, H), bias (V,) or None, targets (N,) long
        n = hidden.shape[0]
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)  # (N,)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, n, chunk_size):
            sl = slice(start, start + chunk_size)
            logits = _logits(hidden[sl], weight, bias)  # (C, V) fp32
            t = targets[sl]
            valid = t != ignore_index
            lse_c = torch.logsumexp(logits, dim=-1)  # (C,)
            target_logit = logits.gather(1, t.clamp(min=0).unsqueeze(1)).squeeze(1)  # (C,)
            total += torch.where(valid, lse_c - target_logit, 0.0).sum()
            lse[sl] = lse_c
            del logits
        ctx.chunk_size, ctx.ignore_index = chunk_size, ignore_index
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if need_h else None  # (N, H)
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None  # (V, H) fp32 accumulator
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if need_b else None  # (V,)
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            sl = slice(start, start + ctx.chunk_size)
            h = hidden[sl]
            t = targets[sl]
            valid = t != ctx.ignore_index
            dz = _logits(h, weight, bias).sub_(lse[sl, None]).exp_()  # (C, V) softmax, in place
            dz[torch.arange(t.shape[0], device=t.device), t.clamp(min=0)] -= 1.0
            dz.mul_((valid.to(dz.dtype) * grad_total)[:, None])  # ignored rows -> 0
            if need_h:
                grad_h[sl] = (dz.to(weight.dtype) @ weight).to(hidden.dtype)  # (C, H)
            if need_w:
                grad_w.addmm_(dz.t(), h.float())  # (V, H)
            if need_b:
                grad_b += dz.sum(0)
            del dz
        return (grad_h, None if grad_w is None else grad_w.to(weight.dtype),
                None if grad_b is None else grad_b.to(bias.dtype), None, None, None)


def _logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.nn.functional.linear(h, weight.to(h.dtype), None if bias is None else bias.to(h.dtype)).float()


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                          bias: torch.Tensor | None = None, reduction: str = "sum",
                          ignore_index: int = IGNORE_INDEX, chunk_size: int = 1024) -> torch.Tensor:
    """Cross-entropy of `hidden @ weight^T (+ bias)` against `targets` without the full logits.

    hidden (..., H); weight (V, H); targets (...) long. reduction: "sum" over target tokens or "mean"
    over them (0 target tokens: "mean" gives 0, not NaN). Equals
    `F.cross_entropy(F.linear(hidden, weight, bias).float().flatten(0, -2), targets.flatten(), ...)`.
    """
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    h = hidden.reshape(-1, hidden.shape[-1])  # (N, H)
    t = targets.reshape(-1)  # (N,)
    total = ChunkedCrossEntropyFunction.apply(h, weight, bias, t, int(chunk_size), ignore_index)
    if reduction == "mean":
        total = total / (t != ignore_index).sum().clamp(min=1)
    return total


def causal_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                   bias: torch.Tensor | None = None, reduction: str = "sum",
                   ignore_index: int = IGNORE_INDEX, chunk_size: int = 1024) -> torch.Tensor:
    """Next-token loss: position t of hidden (B, T, H) predicts labels[:, t + 1] (labels (B, T)).

    The labels are shifted (a final ignore column appended) rather than the hidden states sliced, so no
    (B, T-1, H) copy is made.
    """
    pad = labels.new_full((labels.shape[0], 1), ignore_index)
    targets = torch.cat([labels[:, 1:], pad], dim=1)  # (B, T)
    return chunked_cross_entropy(hidden, weight, targets, bias=bias, reduction=reduction,
                                 ignore_index=ignore_index, chunk_size=chunk_size)
