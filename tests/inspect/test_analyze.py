"""analyze_model on tiny Llamas: DoRA's ΔW is the merged weight minus W and its magnitudes are reported;
an NF4 base is analysed through its dequantized weight."""

import pytest
import torch

import lorafit as lf
from lorafit.inspect.analyze import analyze_model
from lorafit.lora.inject import lora_layers
from lorafit.quant.apply import quantize_model
from tests.conftest import make_llama


def test_dora_update_and_magnitudes():
    model = lf.apply_lora(make_llama(), lf.LoraConfig(r=4, use_dora=True, init="random", target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_magnitude["default"].mul_(1.1)  # as if training had grown every magnitude by 10%
    analysis = analyze_model(model, intruder_k=3)
    assert len(analysis.modules) == 4 and all(m.magnitude for m in analysis.modules)
    path, layer = next(iter(lora_layers(model)))
    stats = next(m for m in analysis.modules if m.path == path)
    W = layer.base_layer.weight.detach().float()
    dW_plus_W = W + layer.delta_weight("default")
    merged = layer.lora_magnitude["default"].detach()[:, None] * dW_plus_W / dW_plus_W.norm(dim=1, keepdim=True)
    assert stats.delta_fro == pytest.approx(float((merged - W).norm()), rel=1e-5)
    m = layer.lora_magnitude["default"].detach()
    assert stats.magnitude["mean"] == pytest.approx(float(m.mean()), rel=1e-6)
    assert stats.magnitude["ratio_mean"] == pytest.approx(float((m / W.norm(dim=1)).mean()), rel=1e-5)


def test_an_nf4_base_is_dequantized():
    model = lf.apply_lora(quantize_model(make_llama(), "nf4"), lf.LoraConfig(r=2, init="random", target_modules=["o_proj"]))
    analysis = analyze_model(model, intruder_k=2)
    path, layer = next(iter(lora_layers(model)))
    stats = next(m for m in analysis.modules if m.path == path)
    W = layer.base_layer.dequantize(torch.float32)
    assert stats.weight_fro == pytest.approx(float(W.norm()), rel=1e-6)
    assert stats.delta_fro == pytest.approx(float(layer.delta_weight("default").norm()), rel=1e-5)
    assert stats.intruders is not None and len(stats.singular_values) == 2


def test_modules_limit_the_suggestion_and_the_plots_to_the_analysed_layers():
    """`--modules`: the suggested rank_pattern covers the analysed modules only (r stays the adapter's, so
    the others keep theirs), and the spectra figure shows those layers with a legend of their colours."""
    from lorafit.inspect.report import grid, spectra_figure
    from lorafit.plots import pyplot

    model = lf.apply_lora(make_llama(), lf.LoraConfig(r=8, init="random", target_modules=["q_proj", "v_proj"]))
    analysis = analyze_model(model, intruder_k=0, modules=r"layers\.1\.self_attn\.q_proj")
    assert [m.path for m in analysis.modules] == ["model.layers.1.self_attn.q_proj"]
    assert analysis.rank_pattern["r"] == 8 and set(analysis.rank_pattern["rank_pattern"]) <= {
        r"model\.layers\.1\.self_attn\.q_proj"}
    layers, names, _ = grid(analysis.modules, "delta_fro")
    assert (layers, names) == ([1], ["q_proj"])
    fig = spectra_figure(analysis)
    legend = fig.axes[0].get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["layer 1"]
    pyplot().close(fig)
