"""Gradient checkpointing of decoder layers with the saved layer inputs optionally offloaded to CPU.

With checkpointing, a layer keeps only its input hidden state (B, T, H) for backward and recomputes
everything else. With `offload=True` that one tensor is copied to (pinned) CPU memory in forward and
brought back just before the layer's recomputation, so GPU memory holds no per-layer activations at
all between forward and backward. On a CPU model the copy is a no-op and the path is plain
checkpointing.

    y = layer(x)          forward under no_grad; keeps x (on CPU if offloading) and the RNG state
    backward(g):          x' = x back on the device, requires grad; y' = layer(x') with the RNG state
                          restored (same dropout masks); backpropagate g through y' (this gives the
                          layer's parameter gradients) and return dL/dx = x'.grad

The recomputation runs the layer exactly as in forward, so anything inside it (the fused LoRA
Function, DoRA, dropout drawn from the global RNG) gives the same numbers as without checkpointing.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch


class OffloadedCheckpointFunction(torch.autograd.Function):
    """Checkpoint `run(hidden)`: save only `hidden` (on CPU when `offload`), recompute in backward."""

    @staticmethod
    def forward(ctx, run: Callable[[torch.Tensor], Any], offload: bool, anchor: torch.Tensor,
                hidden: torch.Tensor) -> torch.Tensor:
        ctx.run, ctx.device = run, hidden.device
        ctx.cpu_rng = torch.get_rng_state()
        ctx.cuda_rng = torch.cuda.get_rng_state(hidden.device) if hidden.is_cuda else None
        ctx.hidden_requires_grad = hidden.requires_grad
        if offload and hidden.is_cuda:
            saved = torch.empty(hidden.shape, dtype=hidden.dtype, pin_memory=True)
            saved.copy_(hidden.detach(), non_blocking=True)
        else:
            saved = hidden.detach()
        ctx.saved_hidden = saved  # not save_for_backward: it may be a CPU copy, never an autograd input
        with torch.no_grad():
            out = run(hidden)
        if isinstance(out, tuple):  # layers returning (hidden, ...) are checkpointed on their first output
            ctx.tuple_len = len(out)
            return out[0]
        ctx.tuple_len = 0
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        hidden = ctx.saved_hidden.to(ctx.device, non_blocking=True).detach().requires_grad_(True)
        ctx.saved_hidden = None
        devices = [ctx.device] if ctx.cuda_rng is not None else []
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            torch.set_rng_state(ctx.cpu_rng)
            if ctx.cuda_rng is not None:
                torch.cuda.set_rng_state(ctx.cuda_rng, ctx.device)
            out = ctx.run(hidden)
            if ctx.tuple_len:
                out = out[0]
        torch.autograd.backward(out, grad_out)
        return None, None, None, hidden.grad if ctx.hidden_requires_grad else None


def checkpoint(run: Callable[..., Any], hidden: torch.Tensor, *args: Any, offload: bool = False) -> Any:
    """Checkpointed `run(hidden, *args)`, the hidden state offloaded to CPU if `offload` (CUDA only).

    Extra positional args (masks, position embeddings) are kept as they are, not offloaded; they are
    assumed not to need gradients.
    """
    anchor = _ANCHOR.get(hidden.device)
    if anchor is None:  # a leaf that requires grad, so backward runs even when `hidden` does not need it
        anchor = _ANCHOR[hidden.device] = torch.empty(0, device=hidden.device, requires_grad=True)
    fn = functools.partial(_call, run, args)
    return OffloadedCheckpointFunction.apply(fn, offload, anchor, hidden)


_ANCHOR: dict[torch.device, torch.Tensor] = {}


def _call(run: Callable[..., Any], args: tuple, hidden: torch.Tensor) -> Any:
    return run(hidden, *args)
