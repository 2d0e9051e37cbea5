"""Per-row routing's fast path: rows grouped by adapter cost two ops per layer; scalings live in the stacks.

Work is counted (aten ops dispatched), never timed.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import lorafit as lf
from lorafit.lora.inject import lora_layers
from lorafit.lora.routing import StackCache
from tests.conftest import MAKERS

SHAPE_ONLY = ("view", "reshape", "_unsafe_view", "alias", "as_strided", "t", "transpose", "detach", "expand",
              "unsqueeze", "squeeze", "slice", "select")


class CountOps(TorchDispatchMode):
    """Counts the aten ops that compute something (views and other shape-only ops are free)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in SHAPE_ONLY:
            self.ops.append(name)
        return func(*args, **(kwargs or {}))


def adapted(names=("a", "b", "c"), ranks=(4, 8, 2)):
    model = MAKERS["llama"]()
    for i, (name, r) in enumerate(zip(names, ranks)):
        lf.add_adapter(model, lf.LoraConfig(r=r, alpha=3 * r, target_modules="all-linear"), name)
        g = torch.Generator().manual_seed(40 + i)
        with torch.no_grad():
            for _, layer in lora_layers(model):
                for p in (layer.lora_A[name], layer.lora_B[name]):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def solo(model, batch: torch.Tensor, rows: list[str | None]) -> torch.Tensor:
    out = []
    for row, name in zip(batch, rows):
        if name is None:
            with lf.disable_adapters(model):
                out.append(model(row[None]).logits)
        else:
            lf.set_adapter(model, name)
            out.append(model(row[None]).logits)
    return torch.cat(out)


@pytest.mark.parametrize(("rows", "identity"), [
    (["a", "a", "b", "b", "c", "c"], True),  # grouped by adapter, equal groups: no gather, no scatter
    (["c", "c", "a", "a", "b", "b"], True),  # any adapter order: the stack follows the rows
    (["a", "b", "c", "a", "b", "c"], False),
    (["a", "a", None, None, "b", "b"], False),
])
def test_rows_grouped_by_adapter_skip_the_gather(rows, identity):
    model = adapted()
    batch = torch.randint(0, 128, (len(rows), 5), generator=torch.Generator().manual_seed(1))
    expected = solo(model, batch, rows)
    with torch.no_grad(), lf.adapter_per_row(model, rows, stacks=StackCache()):
        plans = {layer.routing.route(layer).plan.identity for _, layer in lora_layers(model)}
        got = model(batch).logits
    assert plans == {identity}
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_a_grouped_decode_step_adds_two_ops_per_layer():
    """Base layer: one linear. Routed, rows grouped by adapter: + one bmm (x·sA^T) and one baddbmm_
    (y += h·B^T) for any number of adapters; the scaling is already in the stack."""
    model = adapted()
    layer = model.model.layers[0].self_attn.q_proj
    x = torch.randn(6, 1, layer.in_features)
    with torch.inference_mode():
        with CountOps() as plain:
            layer.base_layer(x)
        for rows, extra in ((["a", "a", "b", "b", "c", "c"], ["bmm", "baddbmm_"]),
                            (["a", "b", "c", "a", "b", "c"], ["index_select", "bmm", "bmm", "index_add_"])):
            with lf.adapter_per_row(model, rows, stacks=StackCache()), CountOps() as routed:
                layer(x)
            assert routed.ops == plain.ops + extra, routed.ops


def test_stacks_follow_a_new_scale():
    model = adapted()
    rows = ["a", "a", "b", "b", "c", "c"]
    batch = torch.randint(0, 128, (6, 5), generator=torch.Generator().manual_seed(2))
    stacks = StackCache()
    with torch.no_grad(), lf.adapter_per_row(model, rows, stacks=stacks):
        model(batch)
    lf.set_adapter_scale(model, "b", 0.25)
    expected = solo(model, batch, rows)
    with torch.no_grad(), lf.adapter_per_row(model, rows, stacks=stacks):
        got = model(batch).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
