"""Causal-LM cross-entropy straight from the final hidden states, a chunk of tokens at a time.

The plain path materializes the (N, V) logits, their fp32 copy and, in backward, an (N, V) gradient:
for N = 2048 tokens and a 49152-token vocabulary that is 400 MB per buffer. Here the output head is
applied to C tokens at a time, so one (C, V) fp32 block lives at once; it is small enough to stay in
cache and to be reused from chunk to chunk instead of faulting in fresh pages.

For token n with hidden state h_n (H,), head W (V, H) (optional bias c (V,)) and target t_n:

    z_n = W h_n + c                      logits (fp32)
    lse_n = log Σ_v exp(z_nv)
    loss_n = lse_n - z_n[t_n]            (0 for t_n = ignore_index)
    L = Σ_n loss_n  (reduction "sum")    or  L / #{n : t_n != ignore_index}  ("mean")

and, with p_n = softmax(z_n) and G = dL/dL_reduced (/ count for "mean"):

    dL/dz_n = G (p_n - onehot(t_n))      (0 for ignored tokens)
    dL/dh_n = W^T dL/dz_n                (N, H)
    dL/dW   = Σ_n dL/dz_n h_n^T          (V, H), only when the head is trainable
    dL/dc   = Σ_n dL/dz_n

The loss is a scalar, so its gradients are known up to the factor G as soon as a chunk's logits
are: when a gradient will be needed, the forward pass turns each chunk's logits into p - onehot in
place and multiplies through the head right away (the idea of fused linear cross-entropy, as in
Liger-Kernel). Backward only scales the stored (N, H) gradient by G. That is two head matmuls per
chunk instead of three (no recompute), and nothing of size V is kept. Tokens whose target is ignored
(a masked prompt, padding) are dropped before the head, so an instruction-tuning batch pays the
(tokens x vocab) products for its response tokens only. Under `torch.no_grad` (eval)
only the loss is computed. The logits are computed in the hidden states' dtype and upcast to fp32,
as `F.cross_entropy(logits.float())` does on the plain path.
"""

from __future__ import annotations

import torch

from lorafit.ops.loss_chunk import CHUNK_BYTES, default_chunk_size  # tokens per chunk: a ~64 MiB block

__all__ = ["CHUNK_BYTES", "IGNORE_INDEX", "ChunkedCrossEntropyFunction", "causal_lm_loss", "chunk_logits",
           "chunked_cross_entropy", "default_chunk_size"]

IGNORE_INDEX = -100


class ChunkedCrossEntropyFunction(torch.autograd.Function):
    """Sum of per-token cross-entropies of `hidden @ weight^T (+ bias)` against `targets`, chunked.

    `need` says which of (hidden, weight, bias) want a gradient; those are computed during forward.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor, chunk_size: int, ignore_index: int,
                need: tuple[bool, bool, bool]) -> torch.Tensor:
        # hidden (N, H), weight (V, H), bias (V,) or None, targets (N,) long
        need_h, need_w, need_b = need
        n = hidden.shape[0]
        grad_h = torch.empty_like(hidden) if need_h else None  # (N, H)
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None  # (V, H) fp32 accumulator
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if need_b else None  # (V,)
        w = weight.to(hidden.dtype)
        b = None if bias is None else bias.to(hidden.dtype)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        buffer = torch.empty(min(chunk_size, n), w.shape[0], dtype=torch.float32, device=hidden.device)
        for start in range(0, n, chunk_size):
            sl = slice(start, start + chunk_size)
            h, t = hidden[sl], targets[sl]
            valid = (t != ignore_index).to(torch.float32)  # (C,)
            rows = torch.arange(t.shape[0], device=t.device)
            z = chunk_logits(h, w, b, buffer[: h.shape[0]])  # (C, V) fp32
            target_logit = z[rows, t.clamp(min=0)]  # (C,)
            zmax = z.amax(dim=1)  # (C,)
            zmax.masked_fill_(zmax.isinf(), 0.0)  # as torch.logsumexp: an infinite logit gives an infinite lse
            p = z.sub_(zmax[:, None]).exp_()  # unnormalized softmax, in place
            sumexp = p.sum(dim=1)  # (C,)
            lse = zmax + sumexp.log()
            total += ((lse - target_logit) * valid).sum()
            if not any(need):
                continue
            dz = p.mul_((valid / sumexp)[:, None])  # softmax; ignored rows -> 0
            dz[rows, t.clamp(min=0)] -= valid  # p - onehot(t)
            if need_h:
                grad_h[sl] = (dz.to(w.dtype) @ w).to(hidden.dtype)  # (C, H)
            if need_w:
                grad_w.addmm_(dz.t(), h.float())  # (V, H)
            if need_b:
                grad_b += dz.sum(0)
        ctx.grads = (grad_h, None if grad_w is None else grad_w.to(weight.dtype),
                     None if grad_b is None else grad_b.to(bias.dtype))
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        grads = tuple(None if g is None else g * grad_total.to(g.dtype) for g in ctx.grads)
        ctx.grads = None  # one backward only, as for any graph that frees its buffers
        return (*grads, None, None, None, None)


def chunk_logits(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
    """fp32 logits of one chunk, written into `out` (computed in h's dtype, then upcast)."""
    if h.dtype == torch.float32:
        torch.mm(h, w.t(), out=out)
        return out if b is None else out.add_(b)
    return out.copy_(torch.nn.functional.linear(h, w, b))


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                          bias: torch.Tensor | None = None, reduction: str = "sum",
                          ignore_index: int = IGNORE_INDEX, chunk_size: int | None = None) -> torch.Tensor:
    """Cross-entropy of `hidden @ weight^T (+ bias)` against `targets` without the full logits.

    hidden (..., H); weight (V, H); targets (...) long. reduction: "sum" over target tokens or "mean"
    over them (0 target tokens: "mean" gives 0, not NaN). chunk_size: tokens per chunk (default: a
    64 MiB fp32 logits block, `default_chunk_size`). Equals
    `F.cross_entropy(F.linear(hidden, weight, bias).float().flatten(0, -2), targets.flatten(), ...)`.
    """
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    h = hidden.reshape(-1, hidden.shape[-1])  # (N, H)
    t = targets.reshape(-1)  # (N,)
    keep = (t != ignore_index).nonzero().squeeze(1)
    if keep.numel() < t.numel():  # prompt and padding tokens never reach the head (their loss is 0)
        h, t = h.index_select(0, keep), t.index_select(0, keep)
    chunk = int(chunk_size) if chunk_size else default_chunk_size(weight.shape[0])
    grad_on = torch.is_grad_enabled()
    need = tuple(grad_on and x is not None and x.requires_grad for x in (h, weight, bias))
    total = ChunkedCrossEntropyFunction.apply(h, weight, bias, t, chunk, ignore_index, need)
    if reduction == "mean":
        total = total / max(keep.numel(), 1)  # the target tokens, counted once above
    return total


def causal_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                   bias: torch.Tensor | None = None, reduction: str = "sum",
                   ignore_index: int = IGNORE_INDEX, chunk_size: int | None = None) -> torch.Tensor:
    """Next-token loss: position t of hidden (B, T, H) predicts labels[:, t + 1] (labels (B, T)).

    The labels are shifted (a final ignore column appended) rather than the hidden states sliced, so no
    (B, T-1, H) copy is made.
    """
    pad = labels.new_full((labels.shape[0], 1), ignore_index)
    targets = torch.cat([labels[:, 1:], pad], dim=1)  # (B, T)
    return chunked_cross_entropy(hidden, weight, targets, bias=bias, reduction=reduction,
                                 ignore_index=ignore_index, chunk_size=chunk_size)
