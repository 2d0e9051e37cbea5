"""FusedLoraFunction against LoraLayer's module path (itself verified against PEFT).

Forward and every gradient (x, A, B, DoRA magnitude, trainable bias) are compared on dense and NF4
bases, with and without dropout (the module path gets the same fixed keep-mask), with and without DoRA.
Tolerances, as max |fused - module| / max |module|: fp32 1e-5; bf16 2e-2 (bf16 has 8 mantissa bits,
and the fused path sums the base and low-rank outputs in a different order).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lorafit.lora.base import fused_weight_source
from lorafit.lora.layer import LoraLayer
from lorafit.ops import fused_lora
from lorafit.ops.fused_lora import fused_lora_linear
from lorafit.quant.linear import NF4Linear

IN, OUT, R = 64, 48, 8
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


class FixedMask(nn.Module):
    """Dropout with a given keep-mask (the reference for a seeded fused mask)."""

    def __init__(self, mask: torch.Tensor, p: float) -> None:
        super().__init__()
        self.mask, self.p = mask, p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.mask.to(x.dtype) / (1 - self.p)


def make_layer(base_kind: str, dtype: torch.dtype, dora: bool, seed: int = 0) -> LoraLayer:
    torch.manual_seed(seed)
    linear = nn.Linear(IN, OUT, bias=True)
    with torch.no_grad():
        linear.bias.normal_(0, 0.1)
    if base_kind == "nf4":
        base = NF4Linear.from_linear(linear)
        base.bias.data = base.bias.data.to(dtype)
    else:
        base = linear.to(dtype)
        base.weight.requires_grad_(False)
    base.bias.requires_grad_(True)  # bias="lora_only": the bias trains and must get its gradient
    layer = LoraLayer(base)
    layer.add("a", R, 16, use_dora=dora, init="random")
    layer.active = ["a"]
    if dora:
        with torch.no_grad():  # move m off its initial value so dL/dm is not trivially tied to B
            layer.lora_magnitude["a"].mul_(torch.rand(OUT) + 0.5)
    return layer.train()


def grads(layer: LoraLayer, y: torch.Tensor, x: torch.Tensor, g: torch.Tensor) -> dict[str, torch.Tensor]:
    params = {"A": layer.lora_A["a"], "B": layer.lora_B["a"], "bias": layer.base_layer.bias}
    if "a" in layer.lora_magnitude:
        params["m"] = layer.lora_magnitude["a"]
    out = torch.autograd.grad(y, [x, *params.values()], g)
    return {"y": y.detach(), "x": out[0], **dict(zip(params, out[1:]))}


def assert_close(got: dict, ref: dict, tol: float) -> None:
    assert got.keys() == ref.keys()
    for k in ref:
        a, b = got[k].float(), ref[k].float()
        err = (a - b).abs().max().item() / max(b.abs().max().item(), 1e-6)
        assert err <= tol, f"{k}: relative error {err:.2e} > {tol:.0e}"


def run_fused(layer: LoraLayer, x: torch.Tensor, g: torch.Tensor, p: float, mask) -> dict:
    base = layer.base_layer
    weight, weight_fn = fused_weight_source(base)
    y = fused_lora_linear(x, layer.lora_A["a"], layer.lora_B["a"], layer.effective_scaling("a"),
                          weight=weight, weight_fn=weight_fn, bias=base.bias,
                          magnitude=layer.lora_magnitude.get("a"),
                          dropout=p, mask=mask)
    return grads(layer, y, x, g)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("base_kind", ["dense", "nf4"])
@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_fused_matches_module(dtype, base_kind, dora, p):
    layer = make_layer(base_kind, dtype, dora)
    layer.fused = False  # the reference: the module path
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, IN, generator=gen).to(dtype).requires_grad_(True)
    g = torch.randn(2, 5, OUT, generator=gen).to(dtype)
    mask = torch.rand(2, 5, IN, generator=gen) > p if p else None
    if mask is not None:
        layer.lora_dropout["a"] = FixedMask(mask, p)
    ref = grads(layer, layer(x), x, g)
    got = run_fused(layer, x, g, p, mask)
    assert got["y"].dtype == ref["y"].dtype == dtype
    assert_close(got, ref, TOL[dtype])


@pytest.mark.parametrize("dora", [False, True])
def test_layer_takes_the_fused_path_by_default(dora, monkeypatch):
    """LoraLayer.forward takes the fused path by default and gives the module path's numbers,
    including a dropout mask drawn from the global RNG (the draw nn.Dropout makes on CPU)."""
    layer = make_layer("nf4", torch.float32, dora)
    layer.lora_dropout["a"] = nn.Dropout(0.25)
    x = torch.randn(3, 7, IN, requires_grad=True)
    g = torch.randn(3, 7, OUT)
    layer.fused = False
    torch.manual_seed(5)
    ref = grads(layer, layer(x), x, g)
    layer.fused = True
    assert layer.fused_adapter() == "a"
    calls = []
    monkeypatch.setattr(fused_lora.FusedLoraFunction, "apply",
                        lambda *a, _f=fused_lora.FusedLoraFunction.apply: calls.append(1) or _f(*a))
    torch.manual_seed(5)
    got = grads(layer, layer(x), x, g)
    assert calls, "the fused Function was not used"
    assert_close(got, ref, 1e-5)
    layer.eval()  # eval: no dropout on either path
    with torch.no_grad():
        y_fused = layer(x)
        layer.fused = False
        torch.testing.assert_close(y_fused, layer(x), rtol=1e-5, atol=1e-6)


def test_fused_saves_no_dense_weight():
    """Backward of an NF4 base saves nothing of size out*in: the weight is dequantized again."""
    layer = make_layer("nf4", torch.float32, dora=False)
    x = torch.randn(4, IN, requires_grad=True)
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run_fused(layer, x, torch.randn(4, OUT), 0.0, None)
    assert IN * OUT not in sizes
    assert max(sizes) == max(IN * R, OUT * R, x.numel())


def test_falls_back_when_not_applicable():
    layer = make_layer("dense", torch.float32, dora=False)
    assert layer.fused_adapter() == "a"
    layer.add("b", 4, 8, init="random")
    layer.active = ["a", "b"]
    assert layer.fused_adapter() is None  # two active adapters: module path
    layer.active = ["a"]
    layer.disabled = True
    assert layer.fused_adapter() is None
    layer.disabled = False
    layer.fused = False
    assert layer.fused_adapter() is None
    layer.fused = True
    layer.base_layer.weight.requires_grad_(True)  # a trainable base weight: autograd must see it
    assert layer.fused_adapter() is None


@pytest.mark.parametrize("dora", [False, True])
def test_16bit_compute_dtype_keeps_fp32_master_gradients(dora):
    """The CUDA choice (low-rank path in x's 16-bit dtype), run here on CPU: fp32 gradients for A and B
    (and m), close to the fp32 path's within bf16 rounding."""
    layer = make_layer("dense", torch.bfloat16, dora)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 5, IN, generator=gen).to(torch.bfloat16).requires_grad_(True)
    g = torch.randn(2, 5, OUT, generator=gen).to(torch.bfloat16)
    ref = run_fused(layer, x, g, 0.0, None)
    base = layer.base_layer
    y = fused_lora_linear(x, layer.lora_A["a"], layer.lora_B["a"], layer.effective_scaling("a"),
                          weight=base.weight, bias=base.bias, magnitude=layer.lora_magnitude.get("a"),
                          compute_dtype=torch.bfloat16)
    got = grads(layer, y, x, g)
    assert got["A"].dtype == got["B"].dtype == torch.float32
    assert_close(got, ref, 2e-2)
