"""Hot-swap on CPU: outputs equal a fresh load; after torch.compile, swaps among ranks never recompile."""

import pytest
import torch
from torch._dynamo.testing import CompileCounter

import lorafit as lf
from lorafit.lora.inject import lora_layers
from tests.conftest import make_llama, refused_in_one_line

TARGETS = ["q_proj", "v_proj", "down_proj"]
SPECS = {  # three adapters of different ranks and scalings; "c" is smaller and adapts fewer modules
    "a": dict(r=4, alpha=8, target_modules=TARGETS),
    "b": dict(r=8, alpha=4, use_rslora=True, target_modules=TARGETS, rank_pattern={"v_proj": 6}),
    "c": dict(r=2, alpha=5, target_modules=["q_proj", "down_proj"]),
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    out = {}
    for i, (name, kw) in enumerate(SPECS.items()):
        model = lf.apply_lora(make_llama(), lf.LoraConfig(init="random", **kw))
        g = torch.Generator().manual_seed(20 + i)
        with torch.no_grad():
            for _, layer in lora_layers(model):
                for p in (layer.lora_A["default"], layer.lora_B["default"]):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        out[name] = lf.save_adapter(model, tmp_path_factory.mktemp(name))
    return out


def _fresh(folder, ids):
    with torch.no_grad():
        return lf.load_adapter(make_llama(), folder)(ids).logits


def test_hotswap_equals_a_fresh_load_and_keeps_the_name(folders, ids, tmp_path):
    model = lf.load_adapter(make_llama(), folders["a"], adapter="x")
    for name in ("b", "c", "a"):
        lf.hotswap_adapter(model, folders[name], "x")
        assert lf.active_adapters(model) == ["x"]
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, _fresh(folders[name], ids), atol=1e-5, rtol=0)
    lf.hotswap_adapter(model, folders["b"], "x")  # the swapped adapter saves as itself
    lf.save_adapter(model, tmp_path, "x")
    torch.testing.assert_close(_fresh(tmp_path, ids), _fresh(folders["b"], ids), atol=1e-5, rtol=0)


def test_compiled_hotswap_never_recompiles(folders, ids, tmp_path):
    torch._dynamo.reset()
    model = lf.load_adapter(make_llama(), folders["a"])
    lf.prepare_for_compiled_hotswap(model, max_rank=8)
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids).logits, _fresh(folders["a"], ids), atol=1e-5, rtol=0)
        compiles = counter.frame_count
        assert compiles > 0
        for name in ("b", "c", "a", "c"):  # to a larger rank, a smaller one, fewer modules, and back
            lf.hotswap_adapter(model, folders[name], "default")
            torch.testing.assert_close(compiled(ids).logits, _fresh(folders[name], ids), atol=1e-5, rtol=0)
    print(f"\ncompiled frames: {compiles} after the first call, {counter.frame_count} after 4 swaps")
    assert counter.frame_count == compiles
    lf.save_adapter(model, tmp_path)  # padded to rank 8 with the scaling folded in: still the same adapter
    torch.testing.assert_close(_fresh(tmp_path, ids), _fresh(folders["c"], ids), atol=1e-5, rtol=0)
    torch._dynamo.reset()


def test_refusals_are_one_line_and_change_nothing(folders):
    model = lf.load_adapter(make_llama(), folders["c"])
    assert "adapts" in refused_in_one_line(model, lambda: lf.hotswap_adapter(model, folders["a"], "default"))  # more modules
    assert "no adapter named" in refused_in_one_line(model, lambda: lf.hotswap_adapter(model, folders["c"], "other"))
    model = lf.load_adapter(make_llama(), folders["a"])
    assert "max_rank" in refused_in_one_line(model, lambda: lf.prepare_for_compiled_hotswap(model, max_rank=2))
    lf.prepare_for_compiled_hotswap(model, max_rank=4)
    assert "max_rank" in refused_in_one_line(model, lambda: lf.hotswap_adapter(model, folders["b"], "default"))
