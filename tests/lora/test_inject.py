"""apply/merge/switch/scale/delete/disable on tiny real models (Llama and GPT-2's Conv1D)."""

import pytest
import torch
from transformers import AutoModelForCausalLM

import lorafit as lf
from lorafit.lora.inject import lora_layers
from tests.conftest import MAKERS


def _randomize(model, adapter="default", seed=5):
    """A trained-looking adapter: random A and B (B=0 would hide every bug)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            if adapter in layer.lora_A:
                for p in (layer.lora_A[adapter], layer.lora_B[adapter]):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("init", ["kaiming", "gaussian", "zeros"])
def test_init_gives_exact_base_logits(family, init, ids):
    model = MAKERS[family]()
    base = model(ids).logits
    lf.apply_lora(model, lf.LoraConfig(r=8, init=init))
    assert any(True for _ in lora_layers(model))
    assert torch.equal(model(ids).logits, base)


def test_pissa_init_keeps_output(ids):
    model = MAKERS["llama"]()
    base = model(ids).logits
    lf.apply_lora(model, lf.LoraConfig(r=4, init="pissa"))
    torch.testing.assert_close(model(ids).logits, base, atol=1e-5, rtol=0)


def test_default_targets_per_family():
    llama = lf.apply_lora(MAKERS["llama"](), lf.LoraConfig())
    names = {p.rsplit(".", 1)[-1] for p, _ in lora_layers(llama)}
    assert names == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    gpt2 = lf.apply_lora(MAKERS["gpt2"](), lf.LoraConfig())
    assert {p.rsplit(".", 1)[-1] for p, _ in lora_layers(gpt2)} == {"c_attn", "c_proj", "c_fc"}


def test_all_linear_excludes_output_head():
    model = lf.apply_lora(MAKERS["llama"](), lf.LoraConfig(target_modules="all-linear"))
    paths = [p for p, _ in lora_layers(model)]
    assert "lm_head" not in paths and len(paths) == 2 * 7


def test_regex_layers_and_rank_pattern():
    config = lf.LoraConfig(r=8, target_modules=r".*\.(q_proj|v_proj)", layers_to_transform=[1],
                           rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 32})
    model = lf.apply_lora(MAKERS["llama"](), config)
    layers = dict(lora_layers(model))
    assert sorted(layers) == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    assert layers["model.layers.1.self_attn.v_proj"].lora_A["default"].shape[0] == 2
    assert layers["model.layers.1.self_attn.q_proj"].scaling["default"] == 32 / 8


def test_only_adapter_parameters_train(family, ids):
    model = MAKERS[family]()
    lf.apply_lora(model, lf.LoraConfig(r=4, use_dora=True))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    optimizer = torch.optim.AdamW(lf.adapter_parameters(model), lr=1e-2)
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {
        id(p) for n, p in model.named_parameters() if n in trainable}
    model(ids, labels=ids).loss.backward()
    for name, p in model.named_parameters():
        if name in trainable:  # A's gradient is exactly zero while B is still zero; B's is not
            assert p.grad is not None, name
            assert ".lora_A." in name or p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    n_trainable, n_total = lf.trainable_parameters(model)
    assert n_trainable == sum(p.numel() for n, p in model.named_parameters() if n in trainable)
    assert n_total == sum(p.numel() for p in model.parameters())
    line = lf.print_trainable_parameters(model)
    assert line == (f"trainable params: {n_trainable:,} || all params: {n_total:,} || "
                    f"trainable%: {100 * n_trainable / n_total:.4f}")


@pytest.mark.parametrize("dora", [False, True])
def test_merge_unmerge(family, dora, ids):
    model = MAKERS[family]()
    base_weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    lf.apply_lora(model, lf.LoraConfig(r=8, use_dora=dora))
    _randomize(model)
    unmerged = model(ids).logits
    lf.merge_adapter(model)
    torch.testing.assert_close(model(ids).logits, unmerged, atol=1e-5, rtol=0)
    lf.merge_adapter(model)  # merging twice is a no-op
    torch.testing.assert_close(model(ids).logits, unmerged, atol=1e-5, rtol=0)
    lf.unmerge_adapter(model)
    torch.testing.assert_close(model(ids).logits, unmerged, atol=1e-5, rtol=0)
    for name, p in model.named_parameters():
        if ".lora_" not in name:
            torch.testing.assert_close(p, base_weights[name.replace(".base_layer", "")], atol=1e-6, rtol=0)


def test_merge_and_unload_saves_a_normal_checkpoint(family, ids, tmp_path):
    model = MAKERS[family]()
    classes = {n: type(m) for n, m in model.named_modules()}
    lf.apply_lora(model, lf.LoraConfig(r=8))
    _randomize(model)
    adapted = model(ids).logits
    plain = lf.merge_and_unload(model)
    assert not any(isinstance(m, lf.LoraLayer) for m in plain.modules())
    assert {n: type(m) for n, m in plain.named_modules()} == classes
    torch.testing.assert_close(plain(ids).logits, adapted, atol=1e-5, rtol=0)
    plain.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(reloaded(ids).logits, adapted, atol=1e-5, rtol=0)


def _single(family, seed, r, ids, scale=1.0):
    model = MAKERS[family]()
    lf.apply_lora(model, lf.LoraConfig(r=r))
    _randomize(model, seed=seed)
    if scale != 1.0:
        lf.set_adapter_scale(model, "default", scale)
    return model(ids).logits


def test_two_adapters_switch_scale_delete_disable(family, ids):
    base = MAKERS[family]()(ids).logits
    only_a, only_b = _single(family, 1, 4, ids), _single(family, 2, 8, ids)
    model = MAKERS[family]()
    lf.add_adapter(model, lf.LoraConfig(r=4), "a")
    lf.add_adapter(model, lf.LoraConfig(r=8), "b")
    _randomize(model, "a", seed=1)
    _randomize(model, "b", seed=2)
    assert lf.active_adapters(model) == ["a"]
    torch.testing.assert_close(model(ids).logits, only_a, atol=1e-6, rtol=0)
    lf.set_adapter(model, "b")
    torch.testing.assert_close(model(ids).logits, only_b, atol=1e-6, rtol=0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".b" in n for n in trainable)

    with lf.disable_adapters(model):
        torch.testing.assert_close(model(ids).logits, base, atol=1e-6, rtol=0)
    torch.testing.assert_close(model(ids).logits, only_b, atol=1e-6, rtol=0)

    lf.set_adapter_scale(model, "b", 0.0)
    torch.testing.assert_close(model(ids).logits, base, atol=1e-6, rtol=0)
    lf.set_adapter_scale(model, "b", 2.0)
    torch.testing.assert_close(model(ids).logits, _single(family, 2, 8, ids, scale=2.0), atol=1e-6, rtol=0)
    lf.set_adapter_scale(model, "b", 1.0)

    lf.merge_adapter(model)  # disabling a merged adapter unmerges inside and re-merges after
    with lf.disable_adapters(model):
        torch.testing.assert_close(model(ids).logits, base, atol=1e-5, rtol=0)
    torch.testing.assert_close(model(ids).logits, only_b, atol=1e-5, rtol=0)
    lf.unmerge_adapter(model)

    lf.delete_adapter(model, "b")
    with pytest.raises(lf.LorafitError, match="no adapter named 'b'"):
        lf.set_adapter(model, "b")
    lf.set_adapter(model, "a")
    torch.testing.assert_close(model(ids).logits, only_a, atol=1e-6, rtol=0)
    lf.delete_adapter(model, "a")  # the last one: the model is its plain self again
    fresh = MAKERS[family]()
    assert not any(isinstance(m, lf.LoraLayer) for m in model.modules())
    assert model.state_dict().keys() == fresh.state_dict().keys()
    torch.testing.assert_close(model(ids).logits, base, atol=1e-6, rtol=0)


def test_scale_doubles_the_layer_delta():
    torch.manual_seed(0)
    layer = lf.LoraLayer(torch.nn.Linear(16, 8))
    layer.add("x", r=4, alpha=4, init="random")
    layer.active = ["x"]
    inp = torch.randn(3, 16)
    delta = layer(inp) - layer.base_layer(inp)
    layer.user_scale["x"] = 2.0
    torch.testing.assert_close(layer(inp) - layer.base_layer(inp), 2 * delta)


def _solo_logits(model, batch: torch.Tensor, rows: list[str | None]) -> torch.Tensor:
    """Each row run alone with its adapter set (None: adapters disabled), concatenated."""
    expected = []
    for row, name in zip(batch, rows):
        if name is None:
            with lf.disable_adapters(model):
                expected.append(model(row[None]).logits)
        else:
            lf.set_adapter(model, name)
            expected.append(model(row[None]).logits)
    return torch.cat(expected)


def test_mixed_adapter_rows_equal_single_runs(ids):
    model = MAKERS["llama"]()
    for i, (name, r) in enumerate([("a", 4), ("b", 8), ("c", 2)]):
        lf.add_adapter(model, lf.LoraConfig(r=r, target_modules="all-linear"), name)
        _randomize(model, name, seed=10 + i)
    rows = ["a", None, "c", "b"]
    batch = torch.cat([ids, ids.flip(0)])  # 4 rows
    expected = _solo_logits(model, batch, rows)
    with lf.adapter_per_row(model, rows):
        mixed = model(batch).logits
    torch.testing.assert_close(mixed, expected, atol=1e-5, rtol=0)


def _mixed_setup(ids):
    model = MAKERS["llama"]()
    for i, (name, r) in enumerate([("a", 4), ("b", 8)]):
        lf.add_adapter(model, lf.LoraConfig(r=r, alpha=3 * r, target_modules="all-linear"), name)
        _randomize(model, name, seed=20 + i)
    return model, ["b", None, "a", "a"], torch.cat([ids, ids.flip(0)])


def test_stacked_rows_equal_grouped_rows(ids, monkeypatch):
    """The fast stacked layout (multi_lora) and the grouped reference give the same logits."""
    model, rows, batch = _mixed_setup(ids)
    with torch.no_grad(), lf.adapter_per_row(model, rows):
        assert all(layer.routing.route(layer).plan is not None for _, layer in lora_layers(model))
        fast = model(batch).logits
    monkeypatch.setattr("lorafit.ops.multi_lora.MAX_PADDING", 0.0)  # every layer declines the stacked layout
    with torch.no_grad(), lf.adapter_per_row(model, rows):
        assert all(layer.routing.route(layer).plan is None for _, layer in lora_layers(model))
        grouped = model(batch).logits
    torch.testing.assert_close(fast, grouped, atol=1e-5, rtol=0)


def test_stacked_weights_follow_changes(ids):
    """The cached stack is rebuilt after an in-place weight change and a re-added adapter (even one
    built under inference_mode); a forward that wants gradients still trains A and B."""
    model, rows, batch = _mixed_setup(ids)
    with torch.inference_mode(), lf.adapter_per_row(model, rows):
        model(batch)
    _randomize(model, "a", seed=30)  # in place
    lf.delete_adapter(model, "b")
    lf.add_adapter(model, lf.LoraConfig(r=2, target_modules="all-linear"), "b")
    _randomize(model, "b", seed=31)
    expected = _solo_logits(model, batch, rows)
    with torch.no_grad(), lf.adapter_per_row(model, rows):
        mixed = model(batch).logits
    torch.testing.assert_close(mixed, expected, atol=1e-5, rtol=0)
    with lf.adapter_per_row(model, rows):  # gradients wanted: the grouped path, through A and B
        model(batch).logits.sum().backward()
    assert model.model.layers[0].self_attn.q_proj.lora_A["a"].grad is not None


def test_adapters_leaving_the_batch_reuse_the_stack(ids):
    """A batch over a subset of the stacked adapters keeps the stack (absent ones are padding)."""
    model, rows, batch = _mixed_setup(ids)  # rows use "a" and "b"
    layer = model.model.layers[0].mlp.down_proj
    with torch.no_grad(), lf.adapter_per_row(model, rows):
        model(batch)
        stack = layer.routing.route(layer).stacked[0]
    fewer = ["a", None, "a", "a"]
    with torch.no_grad(), lf.adapter_per_row(model, fewer):
        route = layer.routing.route(layer)
        assert route.stacked[0] is stack and route.plan.groups == 2
        mixed = model(batch).logits
    lf.set_adapter(model, "a")
    with torch.no_grad():
        expected = model(batch).logits
        with lf.disable_adapters(model):
            expected[1] = model(batch[1:2]).logits[0]
    torch.testing.assert_close(mixed, expected, atol=1e-5, rtol=0)


def test_embedding_and_modules_to_save(ids, tmp_path):
    model = MAKERS["llama"]()
    base = model(ids).logits
    lf.apply_lora(model, lf.LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"], modules_to_save=["lm_head"]))
    torch.testing.assert_close(model(ids).logits, base)
    model(ids, labels=ids).loss.backward()
    emb = model.model.embed_tokens
    assert emb.lora_B["default"].grad is not None
    assert model.lm_head.copies["default"].weight.grad is not None
    assert model.lm_head.original.weight.grad is None


def test_target_entries_that_match_nothing_are_named():
    model = MAKERS["llama"]()
    with pytest.warns(UserWarning, match=r"target_modules \['q_prj', 'c_attn'\] match no module of LlamaForCausalLM "
                                         r"\(the others are adapted\); its linear modules are: q_proj, k_proj"):
        lf.apply_lora(model, lf.LoraConfig(r=2, target_modules=["q_prj", "v_proj", "c_attn"]))
    assert sorted({p.rsplit(".", 1)[-1] for p, _ in lora_layers(model)}) == ["v_proj"]
