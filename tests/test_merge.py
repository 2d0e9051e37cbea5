"""What a merge into a 4-bit base keeps of the trained update: survival per layer (lorafit.merge)."""

from __future__ import annotations

import pytest
import torch

import lorafit as lf
from lorafit.lora.inject import lora_layers
from lorafit.merge import format_report, merge_quantized
from lorafit.quant.apply import quantize_model
from tests.conftest import make_llama


@pytest.mark.parametrize("scale, low, high", [(1e-4, -0.2, 0.2), (3.0, 0.95, 1.05)])
def test_survival_says_how_much_of_the_update_requantization_keeps(scale, low, high):
    """An update far below NF4's rounding step is rounded away (survival near 0); one far above it is
    carried almost whole (survival near 1, residual small)."""
    model = quantize_model(make_llama(), "nf4")
    lf.apply_lora(model, lf.LoraConfig(r=4, init="random"))
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B["default"].normal_(0, scale, generator=torch.Generator().manual_seed(0))
        report = merge_quantized(model)
    assert len(report) == len(list(lora_layers(model))) == 14
    assert all(low < e.survival < high for e in report), [round(e.survival, 3) for e in report]
    if scale > 1:
        assert all(e.residual < 0.3 for e in report)
    assert "share of the trained update that survives requantization" in format_report(report)
