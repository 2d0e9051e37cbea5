"""The stacked per-row LoRA op against the grouped reference (`reference.lora_rows`).

Rows with no adapter, adapters of different ranks and scalings, uneven groups, 2-D and 3-D inputs.
Tolerance: fp32 matmuls in a different order, 1e-5 absolute on O(1) values; rows with no adapter
must be exactly zero.
"""

from __future__ import annotations

import pytest
import torch

from lorafit.ops import multi_lora
from lorafit.ops import reference as ops

IN, OUT = 24, 20


def adapters(ranks: list[int], seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(r, IN, generator=g), torch.randn(OUT, r, generator=g)) for r in ranks]


def both(x: torch.Tensor, row_groups: list[int | None], ranks: list[int], scales: list[float]):
    weights = adapters(ranks)
    groups = [(torch.tensor([i for i, g in enumerate(row_groups) if g == k], dtype=torch.long), A, B, s)
              for k, ((A, B), s) in enumerate(zip(weights, scales)) if k in row_groups]
    expected = ops.lora_rows(x, groups)
    plan = multi_lora.plan_rows(row_groups, scales, max_padding=float("inf"))
    At, Bt = multi_lora.stack_adapters([A for A, _ in weights], [B for _, B in weights])
    return multi_lora.lora_rows_stacked(x, At, Bt, plan), expected


def added(x: torch.Tensor, row_groups: list[int | None], ranks: list[int], scales: list[float]):
    """(y + stacked in place, y + grouped in place, y + reference) for a random y."""
    weights = adapters(ranks)
    groups = [(torch.tensor([i for i, g in enumerate(row_groups) if g == k], dtype=torch.long), A, B, s)
              for k, ((A, B), s) in enumerate(zip(weights, scales)) if k in row_groups]
    y = torch.randn(*x.shape[:-1], OUT)
    plan = multi_lora.plan_rows(row_groups, scales, max_padding=float("inf"))
    At, Bt = multi_lora.stack_adapters([A for A, _ in weights], [B for _, B in weights])
    return (multi_lora.add_lora_rows_stacked_(y.clone(), x, At, Bt, plan),
            multi_lora.add_lora_rows_grouped_(y.clone(), x, groups), y + ops.lora_rows(x, groups), y)


@pytest.mark.parametrize("shape", [(), (5,), (3, 2)])
@pytest.mark.parametrize("row_groups", [
    [0, 1, 2, 0, 1, 2],  # balanced, every row adapted
    [0, None, 1, None, 0, 2],  # rows with no adapter
    [None, None, 1, None],  # only one adapter present (of three loaded)
    [2, 2, 2, 2, 0, None],  # uneven groups
])
def test_matches_reference(shape, row_groups):
    torch.manual_seed(1)
    x = torch.randn(len(row_groups), *shape, IN)
    got, expected = both(x, row_groups, ranks=[4, 8, 2], scales=[0.5, 2.0, 1.25])
    assert got.shape == expected.shape == (len(row_groups), *shape, OUT)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    base = [i for i, g in enumerate(row_groups) if g is None]
    assert torch.equal(got[base], torch.zeros_like(got[base]))


@pytest.mark.parametrize("row_groups", [[0, 1, 2, 0, 1, 2], [0, None, 1, None, 0, 2], [2, 2, 2, 2, 0, None]])
def test_in_place_adds_match_reference(row_groups):
    torch.manual_seed(2)
    x = torch.randn(len(row_groups), 3, IN)
    stacked, grouped, expected, y = added(x, row_groups, ranks=[4, 8, 2], scales=[0.5, 2.0, 1.25])
    torch.testing.assert_close(stacked, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grouped, expected, atol=1e-5, rtol=1e-5)
    base = [i for i, g in enumerate(row_groups) if g is None]
    assert torch.equal(stacked[base], y[base]) and torch.equal(grouped[base], y[base])


def test_rows_with_no_adapter_stay_zero_next_to_an_overflowed_row():
    x = torch.randn(3, IN)
    x[0] = float("inf")  # row 0 (adapter 0) overflowed; padding slots read row 0
    got, _ = both(x, [0, None, 1], ranks=[4, 4], scales=[1.0, 1.0])
    assert torch.equal(got[1], torch.zeros(OUT))
    assert torch.isfinite(got[2]).all()


def test_plan_declines_heavy_padding():
    skewed = [0] * 8 + [1, 2, 3]  # 4 groups of 8 slots for 11 rows
    assert multi_lora.plan_rows(skewed, [1.0] * 4) is None
    assert multi_lora.plan_rows(skewed, [1.0] * 4, max_padding=3.0) is not None
    assert multi_lora.plan_rows([None, None], []) is None


def test_stack_pads_ranks_with_zeros():
    (A1, B1), (A2, B2) = adapters([2, 5])
    At, Bt = multi_lora.stack_adapters([A1, A2], [B1, B2])
    assert At.shape == (2, IN, 5) and Bt.shape == (2, 5, OUT)
    assert torch.equal(At[0, :, 2:], torch.zeros(IN, 3)) and torch.equal(Bt[0, 2:], torch.zeros(3, OUT))
    assert torch.equal(At[1], A2.t()) and torch.equal(Bt[1], B2.t())
    assert At.is_contiguous() and Bt.is_contiguous()


def folded(x: torch.Tensor, row_groups: list[int | None], ranks: list[int], scales: list[float],
           y_dtype: torch.dtype = torch.float32):
    """(y + the serving path: scalings folded into At, no zero slot; y + reference; the plan; y)."""
    weights = adapters(ranks)
    groups = [(torch.tensor([i for i, g in enumerate(row_groups) if g == k], dtype=torch.long), A, B, s)
              for k, ((A, B), s) in enumerate(zip(weights, scales)) if k in row_groups]
    y = torch.randn(*x.shape[:-1], OUT).to(y_dtype)
    plan = multi_lora.plan_rows(row_groups, n=len(scales), max_padding=float("inf"), zero_slot=False)
    At, Bt = multi_lora.stack_adapters([A for A, _ in weights], [B for _, B in weights], scales)
    expected = (y.float() + ops.lora_rows(x, groups)).to(y_dtype)
    return multi_lora.add_lora_rows_stacked_(y.clone(), x, At, Bt, plan), expected, plan, y


@pytest.mark.parametrize("shape", [(), (3,)])
@pytest.mark.parametrize(("row_groups", "identity"), [
    ([0, 0, 1, 1, 2, 2], True),  # rows in adapter order, equal groups: no gather, no scatter
    ([1, 1, 0, 0, 2, 2], False),  # grouped, but not in stack order
    ([0, None, 1, None, 0, 2], False),  # rows with no adapter: no slot for them
    ([2, 2, 2, 2, 0, None], False),  # uneven: padding slots
])
def test_folded_scales_and_identity_layout_match_reference(shape, row_groups, identity):
    torch.manual_seed(3)
    x = torch.randn(len(row_groups), *shape, IN)
    got, expected, plan, y = folded(x, row_groups, ranks=[4, 8, 2], scales=[0.5, 2.0, 1.25])
    assert plan.identity == identity and plan.scale is None
    assert plan.slots == max(row_groups.count(g) for g in range(3))  # no extra slot for rows with no adapter
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    base = [i for i, g in enumerate(row_groups) if g is None]
    assert torch.equal(got[base], y[base])


def test_identity_layout_with_a_16_bit_base_output():
    x = torch.randn(6, IN)
    got, expected, plan, _ = folded(x, [0, 0, 1, 1, 2, 2], ranks=[4, 8, 2], scales=[0.5, 2.0, 1.25],
                                 y_dtype=torch.bfloat16)
    assert plan.identity and got.dtype == torch.bfloat16
    torch.testing.assert_close(got, expected, atol=2e-2, rtol=2e-2)
