"""Per-row adapters in a handful of ops per layer: the fast path behind `LoraLayer.route`.

The reference (`reference.lora_rows`) runs an index, two thin matmuls and a scatter per adapter
present. Serving 8 adapters on a 210-layer model, that is thousands of tiny calls per decoded
token, and on CPU their fixed cost, not the arithmetic, is what a decode step pays for. Here the
rows are gathered into equal-size slots, `m` per adapter, and two batched matmuls against the
adapters' stacked weights do every adapter at once:

    xs  = x[gather]                     (n, m·T, in)    slot j of group g holds a row of adapter g
    h   = xs @ At                       (n, m·T, r_max) At[g] = scaling_g · A_g^T
    y[gather] += h @ Bt                 (B, T, out)     each slot adds into its own row

At (n, in, r_max) and Bt (n, r_max, out) are the adapters' A^T and B^T, stacked contiguous once
(`stack_adapters`) so that the batched matmuls read them without a per-call transpose copy; each
adapter's scaling is folded into its slice of At there, once, instead of scaling h every call
(`plan_rows(..., scales)` keeps a per-slot scale for stacks made without). When the rows already
sit in adapter order with m rows each (the engine's batches usually do: requests prefilled
together are grouped by adapter), the gather and the scatter are the identity and drop out:

    y.view(n, m·T, out) += (x.view(n, m·T, in) @ At) @ Bt       two ops per layer, for any n

Slots an adapter does not fill are padding: their `h` is set to zero (not merely scaled by zero,
so a row whose activations overflowed cannot leak NaN into others). Adapters of different ranks
are zero-padded to the largest; zero terms add exactly nothing. The math is the reference's; only
the rounding order differs. Padding costs arithmetic when one adapter has far more rows than the
others, so `plan_rows` declines (returns None) when the slots would outnumber the rows by
`MAX_PADDING`, and the caller keeps the grouped path for that batch. The grouped path is also the
better one for many tokens per row (prefill) unless the layout is the identity, where the stacked
matmuls have no padding and no gathered copies; the `add_*_` versions add into the base output in
place, sparing a (B, T, out) buffer and a sum.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lorafit.ops.reference import lora_delta

MAX_PADDING = 2.0  # slots / rows above which the grouped reference is cheaper
MAX_STACKED_TOKENS = 256  # above this many tokens in the batch, grouped matmuls are cheaper (measured on CPU)


@dataclass(frozen=True)
class RowPlan:
    """Where each batch row goes: built once per batch composition, reused every decode step."""

    gather: torch.Tensor  # (n*m,) long: the batch row each slot reads (padding slots read row 0)
    inverse: torch.Tensor | None  # (B,) long: the slot each row's update comes from (None: no zero slot planned)
    scale: torch.Tensor | None  # (n, m, 1) the scaling of each slot's adapter; None: folded into At
    pad: torch.Tensor | None  # (n, m, 1) bool: True on padding slots; None when there are none
    groups: int  # n
    slots: int  # m
    identity: bool = False  # gather is 0..B-1: rows in adapter order, m each, all adapted


def plan_rows(row_groups: list[int | None], scales: list[float] | None = None, *, n: int | None = None,
              dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
              max_padding: float = MAX_PADDING, zero_slot: bool = True) -> RowPlan | None:
    """The slot layout for rows assigned to groups 0..n-1 (None: no adapter), or None when
    padding would exceed `max_padding` times the rows (use the grouped reference then).

    `scales` (one per group) puts a per-slot scale in the plan; None means the stack has them
    folded in. `n` is the number of stacked groups (default: len(scales)). `zero_slot` gives rows
    with no adapter a padding slot to read, which `lora_rows_stacked` needs and the in-place add
    does not."""
    n = n if n is not None else len(scales or ())
    members: list[list[int]] = [[] for _ in range(n)]
    base = []
    for i, g in enumerate(row_groups):
        (base if g is None else members[g]).append(i)
    m = max((len(rows) for rows in members), default=0)
    if zero_slot and base and all(len(rows) == m for rows in members):
        m += 1  # rows with no adapter need a padding slot to read
    if n == 0 or m == 0 or n * m > max_padding * max(len(row_groups), 1):
        return None
    gather, inverse = [0] * (n * m), [0] * len(row_groups)
    scale, pad = [0.0] * (n * m), [True] * (n * m)
    for g, rows in enumerate(members):
        for j, row in enumerate(rows):
            slot = g * m + j
            gather[slot], inverse[row], pad[slot] = row, slot, False
            scale[slot] = scales[g] if scales is not None else 1.0
    if base and zero_slot:
        empty = pad.index(True)
        for row in base:
            inverse[row] = empty
    return RowPlan(torch.tensor(gather, device=device),
                   torch.tensor(inverse, device=device) if zero_slot or not base else None,
                   torch.tensor(scale, dtype=dtype, device=device).view(n, m, 1) if scales is not None else None,
                   torch.tensor(pad, device=device).view(n, m, 1) if any(pad) else None, n, m,
                   identity=gather == list(range(len(row_groups))))


def stack_adapters(As: list[torch.Tensor], Bs: list[torch.Tensor],
                   scales: list[float] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """At: (n, in, r_max) and Bt: (n, r_max, out) from per-adapter A (r_i, in) and B (out, r_i),
    transposed and zero-padded to the largest rank; with `scales`, At[i] = scales[i] * A_i^T."""
    r_max = max(A.shape[0] for A in As)
    At = As[0].new_zeros(len(As), As[0].shape[1], r_max)
    Bt = Bs[0].new_zeros(len(Bs), r_max, Bs[0].shape[0])
    for i, (A, B) in enumerate(zip(As, Bs)):
        At[i, :, : A.shape[0]] = A.t() if scales is None else A.t() * scales[i]
        Bt[i, : B.shape[1]] = B.t()
    return At, Bt


def _slot_hidden(x: torch.Tensor, At: torch.Tensor, plan: RowPlan) -> torch.Tensor:
    """h = x[gather] @ At, scaled per slot and zero on padding slots: (n, m·T, r)."""
    n, m, r = plan.groups, plan.slots, At.shape[2]
    xs = x if plan.identity else x.index_select(0, plan.gather)  # (n*m, ..., in)
    h = torch.bmm(xs.reshape(n, -1, x.shape[-1]), At)  # (n, m·T, r)
    if plan.scale is not None:
        h.view(n, m, -1, r).mul_(plan.scale[..., None])
    if plan.pad is not None:
        h.view(n, m, -1, r).masked_fill_(plan.pad[..., None], 0.0)
    return h


def slot_deltas(x: torch.Tensor, At: torch.Tensor, Bt: torch.Tensor, plan: RowPlan) -> torch.Tensor:
    """The low-rank update of every slot (padding slots exactly zero): (n*m, ..., out).

    x: (B, ..., in); At: (n, in, r_max); Bt: (n, r_max, out)
    """
    out = torch.bmm(_slot_hidden(x, At, plan), Bt)  # (n, m·T, out)
    return out.view(plan.groups * plan.slots, *x.shape[1:-1], Bt.shape[2])


def lora_rows_stacked(x: torch.Tensor, At: torch.Tensor, Bt: torch.Tensor, plan: RowPlan) -> torch.Tensor:
    """Each row's own low-rank update, as `reference.lora_rows` computes it: (B, ..., out).
    The plan must have a zero slot for rows with no adapter (`plan_rows(zero_slot=True)`)."""
    return slot_deltas(x, At, Bt, plan).index_select(0, plan.inverse)


def add_lora_rows_stacked_(y: torch.Tensor, x: torch.Tensor, At: torch.Tensor, Bt: torch.Tensor,
                           plan: RowPlan) -> torch.Tensor:
    """y += each row's update, in place (no (B, ..., out) delta is allocated): padding slots add
    their exact zeros to row 0; with an identity plan, one batched matmul-add straight into y.
    Only where y need not be kept for autograd. x: (B, ..., in), y: (B, ..., out)."""
    h = _slot_hidden(x if x.dtype == At.dtype else x.to(At.dtype), At, plan)  # (n, m·T, r)
    if plan.identity and y.dtype == h.dtype and y.is_contiguous():
        y.view(plan.groups, -1, y.shape[-1]).baddbmm_(h, Bt)  # (n, m·T, out) += h @ Bt
        return y
    out = torch.bmm(h, Bt).view(plan.groups * plan.slots, *y.shape[1:])  # (n*m, ..., out)
    return y.index_add_(0, plan.gather, out if out.dtype == y.dtype else out.to(y.dtype))


def add_lora_rows_grouped_(y: torch.Tensor, x: torch.Tensor,
                           groups: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]]) -> torch.Tensor:
    """y += `reference.lora_rows(x, groups)`, in place, one adapter at a time.

    For many tokens per row (prefill) the matmuls are big enough to hide their call overhead, and
    this skips the stacked layout's padding and its large temporary buffers."""
    for rows, A, B, scaling in groups:
        y.index_add_(0, rows, lora_delta(x.index_select(0, rows), A, B, scaling).to(y.dtype))
    return y
