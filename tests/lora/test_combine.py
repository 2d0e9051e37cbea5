"""add_weighted_adapter against a direct dense computation from the inputs' ΔW, save/reload, PEFT, refusals."""

import math

import pytest
import torch
from peft import PeftModel

import lorafit as lf
from lorafit.lora.inject import adapter_configs, lora_layers
from tests.conftest import make_gpt2, make_llama, refused_in_one_line

TARGETS = ["q_proj", "v_proj"]
WEIGHTS = [1.0, -0.5, 0.7]
# adapter -> (config, per-module (rank, scaling) worked out by hand from the config)
ADAPTERS = {
    "a": (dict(r=4, alpha=8, use_rslora=True), {"q_proj": (4, 8 / math.sqrt(4)), "v_proj": (4, 8 / math.sqrt(4))}),
    "b": (dict(r=8, alpha=4, rank_pattern={"q_proj": 2}, alpha_pattern={"v_proj": 12}),
          {"q_proj": (2, 4 / 2), "v_proj": (8, 12 / 8)}),
    "c": (dict(r=6, alpha=3), {"q_proj": (6, 3 / 6), "v_proj": (6, 3 / 6)}),
}


def _model():
    model = make_llama()
    g = torch.Generator().manual_seed(11)
    for name, (kw, _) in ADAPTERS.items():
        lf.add_adapter(model, lf.LoraConfig(target_modules=TARGETS, **kw), name)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            for name in ADAPTERS:
                for p in (layer.lora_A[name], layer.lora_B[name]):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def _input_deltas(model):
    """path -> [ΔW_i = s_i B_i A_i] in fp64, with s_i from the table above (not from lorafit)."""
    out = {}
    for path, layer in lora_layers(model):
        kind = path.rsplit(".", 1)[-1]
        deltas = []
        for name, (_, table) in ADAPTERS.items():
            r, s = table[kind]
            A, B = layer.lora_A[name].detach().double(), layer.lora_B[name].detach().double()
            assert A.shape[0] == r
            deltas.append(s * B @ A)
        out[path] = deltas
    return out


def _combined(model, name):
    result = {}
    for path, layer in lora_layers(model):
        assert layer.scaling[name] == 1.0
        result[path] = (layer.lora_B[name].detach().double() @ layer.lora_A[name].detach().double())
    return result


def _best_rank(M, k):
    U, S, Vh = torch.linalg.svd(M)
    return U[:, :k] @ torch.diag(S[:k]) @ Vh[:k]


def _trim(t, density):
    k = int(density * t.numel())
    order = t.abs().flatten().argsort(descending=True)
    mask = torch.zeros(t.numel(), dtype=torch.float64)
    mask[order[:k]] = 1
    return t * mask.view_as(t)


def _reference(deltas, combination, density, seed):
    """TIES (Yadav et al. 2023) and DARE (Yu et al. 2023) written out entry by entry's rules."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for path, taus in deltas.items():
        if combination in ("ties", "magnitude_prune"):
            pruned = [_trim(t, density) for t in taus]
        else:
            pruned = [t * (torch.rand(t.shape, generator=g, dtype=torch.float64) < density) / density for t in taus]
        weighted = [w * t for w, t in zip(WEIGHTS, pruned)]
        if combination in ("magnitude_prune", "dare_linear"):
            out[path] = sum(weighted)
            continue
        total = sum(weighted)
        sign = torch.ones_like(total)
        sign[total < 0] = -1  # elected sign; a zero sum elects +
        kept_sum, kept_count = torch.zeros_like(total), torch.zeros_like(total)
        for t in weighted:
            agrees = (torch.sign(t) == sign).double()
            kept_sum += t * agrees
            kept_count += agrees
        out[path] = torch.where(kept_count > 0, kept_sum / kept_count.clamp(min=1), torch.zeros_like(total))
    return out


@pytest.mark.parametrize("combination", ["cat", "linear"])
def test_cat_and_linear_are_the_weighted_sum_exactly(combination):
    model = _model()
    lf.add_weighted_adapter(model, list(ADAPTERS), WEIGHTS, "mix", combination)
    deltas, got = _input_deltas(model), _combined(model, "mix")
    for path, taus in deltas.items():
        torch.testing.assert_close(got[path], sum(w * t for w, t in zip(WEIGHTS, taus)), atol=1e-6, rtol=1e-5)
    layer = dict(lora_layers(model))["model.layers.0.self_attn.q_proj"]
    if combination == "cat":  # A stacked as given; rank = 4 + 2 + 6
        assert torch.equal(layer.lora_A["mix"], torch.cat([layer.lora_A[n] for n in ADAPTERS]))
        assert layer.lora_A["mix"].shape[0] == 12
    else:
        assert layer.lora_A["mix"].shape[0] <= 12


def test_svd_is_the_best_rank_k_of_the_weighted_sum():
    model = _model()
    lf.add_weighted_adapter(model, list(ADAPTERS), WEIGHTS, "mix", "svd", svd_rank=3)
    deltas, got = _input_deltas(model), _combined(model, "mix")
    for path, taus in deltas.items():
        torch.testing.assert_close(got[path], _best_rank(sum(w * t for w, t in zip(WEIGHTS, taus)), 3),
                                   atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("combination", ["ties", "dare_linear", "dare_ties", "magnitude_prune"])
def test_pruning_combinations_equal_the_published_algorithms(combination):
    model = _model()
    lf.add_weighted_adapter(model, list(ADAPTERS), WEIGHTS, "exact", combination, density=0.4, seed=7,
                            svd_rank=10_000)  # at least min(out, in): the dense result, exactly
    lf.add_weighted_adapter(model, list(ADAPTERS), WEIGHTS, "low", combination, density=0.4, seed=7, svd_rank=5)
    expected = _reference(_input_deltas(model), combination, 0.4, seed=7)
    exact, low = _combined(model, "exact"), _combined(model, "low")
    for path, dense in expected.items():
        assert dense.abs().sum() > 0
        torch.testing.assert_close(exact[path], dense, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(low[path], _best_rank(dense, 5), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("combination", ["cat", "ties"])
def test_combined_adapter_round_trips_through_lorafit_and_peft(combination, ids, tmp_path):
    model = _model()
    lf.add_weighted_adapter(model, list(ADAPTERS), WEIGHTS, "mix", combination, **(
        {"density": 0.5} if combination == "ties" else {}))
    lf.set_adapter(model, "mix")
    expected = model(ids).logits
    lf.save_adapter(model, tmp_path, "mix")

    ours = lf.load_adapter(make_llama(), tmp_path)
    torch.testing.assert_close(ours(ids).logits, expected, atol=1e-5, rtol=0)
    theirs = PeftModel.from_pretrained(make_llama(), tmp_path).eval()
    torch.testing.assert_close(theirs(ids).logits, expected, atol=1e-5, rtol=0)


def test_bad_input_is_one_line_and_leaves_the_model_unchanged():
    model = _model()
    lf.add_adapter(model, lf.LoraConfig(r=4, target_modules=["k_proj", "q_proj"]), "d")
    lf.add_adapter(model, lf.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True), "dora")
    assert "unknown combination" in refused_in_one_line(
        model, lambda: lf.add_weighted_adapter(model, ["a", "b"], [1, 1], "x", "average"))
    assert "same layers" in refused_in_one_line(
        model, lambda: lf.add_weighted_adapter(model, ["a", "d"], [1, 1], "x", "cat"))
    assert "DoRA" in refused_in_one_line(model, lambda: lf.add_weighted_adapter(model, ["a", "dora"], [1, 1], "x"))
    assert "density" in refused_in_one_line(model, lambda: lf.add_weighted_adapter(model, ["a", "b"], [1, 1], "x", "ties"))
    assert "one weight per adapter" in refused_in_one_line(model, lambda: lf.add_weighted_adapter(model, ["a", "b"], [1], "x"))


def test_linear_over_different_layers_counts_a_missing_adapter_as_zero():
    model = _model()
    lf.add_adapter(model, lf.LoraConfig(r=3, alpha=6, target_modules=["k_proj", "q_proj"], init="random"), "d")
    lf.add_weighted_adapter(model, ["a", "d"], [0.5, -2.0], "mix", "linear")
    layers = dict(lora_layers(model))
    assert sorted(p for p, layer in layers.items() if "mix" in layer.lora_A) == sorted(
        p for p, layer in layers.items() if "a" in layer.lora_A or "d" in layer.lora_A)
    for layer in layers.values():
        if "mix" in layer.lora_A:
            expected = sum(w * layer.delta_weight(n).double() for w, n in ((0.5, "a"), (-2.0, "d")) if n in layer.lora_A)
            torch.testing.assert_close(_combined_layer(layer, "mix"), expected, atol=1e-6, rtol=1e-5)


def test_gpt2_adapters_with_trained_biases_combine_and_load_in_peft(ids, tmp_path):
    """Conv1D layers, bias="lora_only": the combined adapter carries the biases the model has."""
    model = make_gpt2()
    for i, name in enumerate(("x", "y")):
        lf.add_adapter(model, lf.LoraConfig(r=2 + 2 * i, alpha=4, target_modules=["c_attn", "c_fc"],
                                            bias="lora_only", init="random"), name)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("base_layer.bias"):
                p.add_(0.1)
    lf.add_weighted_adapter(model, ["x", "y"], [1.5, -1.0], "mix", "cat")
    assert adapter_configs(model)["mix"].bias == "lora_only"
    lf.set_adapter(model, "mix")
    expected = model(ids).logits
    lf.save_adapter(model, tmp_path, "mix")
    theirs = PeftModel.from_pretrained(make_gpt2(), tmp_path).eval()
    torch.testing.assert_close(theirs(ids).logits, expected, atol=1e-5, rtol=0)


def _combined_layer(layer, name):
    return layer.lora_B[name].detach().double() @ layer.lora_A[name].detach().double()
