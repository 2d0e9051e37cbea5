"""Checkpointing of decoder layers, with the saved layer inputs optionally offloaded to host memory.

With checkpointing, a layer keeps only its input hidden state (B, T, H) for backward and recomputes
everything else. With `offload=True` that one tensor goes to pinned host memory during forward and
comes back just before the layer's recomputation, so GPU memory holds no per-layer activations at all
between forward and backward (Unsloth's "unsloth" gradient checkpointing follows the same idea):

    forward, layer i      the copy device -> host of x_i starts on a side stream once x_i is ready,
                          while the main stream already computes layer i (x_i's memory is not
                          reused before the copy ends: `record_stream`)
    backward, layer i     x_i's copy host -> device was started on the side stream when layer i+1's
                          backward began (prefetch), so it is usually there already; the main stream
                          waits for it, then recomputes layer i and backpropagates through it; and
                          it starts the copy of x_{i-1} for the next layer

    y = layer(x)          forward under no_grad; keeps x (offloaded or not) and the RNG states
    backward(g):          x' = x back on the device, requires grad; y' = layer(x') with the RNG
                          states restored (same dropout masks); backpropagate g through y' (this
                          gives the layer's parameter gradients) and return dL/dx = x'.grad

The recomputation runs the layer exactly as in forward, so anything inside it (the fused LoRA
Function, DoRA, dropout drawn from the global RNG) gives the same numbers as without checkpointing.
On a CPU model, offloading copies into a separate host buffer and back, synchronously: it saves no
memory there, but the bookkeeping (the prefetch chain, the pairing of copies) runs and is tested on
every machine; the streams and events are the CUDA part.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable
from typing import Any

import torch


class _Offloaded:
    """One saved layer input in host memory, and the way back to the device.

    `prev` is the layer input saved just before this one in forward (the next one backward needs),
    held weakly: a finished step's chain frees itself."""

    def __init__(self, hidden: torch.Tensor, prev: _Offloaded | None) -> None:
        self.device = hidden.device
        self.prev = weakref.ref(prev) if prev is not None else None
        self.back: torch.Tensor | None = None  # the tensor on the device again, once prefetched
        self.ready: torch.cuda.Event | None = None
        if hidden.is_cuda:
            stream = _side_stream(hidden.device)
            stream.wait_stream(torch.cuda.current_stream(hidden.device))  # x is computed
            self.host = torch.empty(hidden.shape, dtype=hidden.dtype, pin_memory=True)
            with torch.cuda.stream(stream):
                self.host.copy_(hidden.detach(), non_blocking=True)
            hidden.record_stream(stream)  # its memory is not handed out again before the copy ends
        else:
            self.host = hidden.detach().clone()

    def prefetch(self) -> None:
        """Start the copy back to the device (on the side stream); a second call does nothing."""
        if self.back is not None or self.host is None:
            return
        if self.device.type != "cuda":
            self.back, self.host = self.host.to(self.device), None
            return
        stream = _side_stream(self.device)
        with torch.cuda.stream(stream):
            self.back = self.host.to(self.device, non_blocking=True)
            self.ready = torch.cuda.Event()
            self.ready.record(stream)
        self.host = None  # the pinned buffer goes back to the caching host allocator after the copy

    def take(self) -> torch.Tensor:
        """The tensor on the device, usable on the current stream; prefetches the previous one."""
        self.prefetch()
        back, self.back = self.back, None
        if self.ready is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(self.ready)
            back.record_stream(current)
        previous = self.prev() if self.prev is not None else None
        if previous is not None:
            previous.prefetch()  # overlaps with this layer's recomputation and backward
        return back


@functools.cache
def _side_stream(device: torch.device) -> torch.cuda.Stream:
    return torch.cuda.Stream(device)


_LAST: dict[torch.device, weakref.ref] = {}  # the newest offloaded input per device: the chain's head


class OffloadedCheckpointFunction(torch.autograd.Function):
    """Checkpoint `run(hidden)`: save only `hidden` (in host memory when `offload`), recompute in backward."""

    @staticmethod
    def forward(ctx, run: Callable[[torch.Tensor], Any], offload: bool, anchor: torch.Tensor,
                hidden: torch.Tensor) -> torch.Tensor:
        ctx.run, ctx.device = run, hidden.device
        ctx.cpu_rng = torch.get_rng_state()
        ctx.cuda_rng = torch.cuda.get_rng_state(hidden.device) if hidden.is_cuda else None
        ctx.hidden_requires_grad = hidden.requires_grad
        if offload:
            last = _LAST.get(hidden.device)
            saved = _Offloaded(hidden, last() if last is not None else None)
            _LAST[hidden.device] = weakref.ref(saved)
            ctx.saved_hidden = saved
        else:
            ctx.saved_hidden = hidden.detach()  # not save_for_backward: it is never an autograd input
        with torch.no_grad():
            out = run(hidden)
        if isinstance(out, tuple):  # layers returning (hidden, ...) are checkpointed on their first output
            ctx.tuple_len = len(out)
            return out[0]
        ctx.tuple_len = 0
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        saved = ctx.saved_hidden
        ctx.saved_hidden = None
        hidden = saved.take() if isinstance(saved, _Offloaded) else saved
        hidden = hidden.detach().requires_grad_(True)
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
    """Checkpointed `run(hidden, *args)`, the hidden state offloaded to host memory if `offload`.

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
