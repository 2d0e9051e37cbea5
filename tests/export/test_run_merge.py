"""`lorafit merge` through the merge module (acceptance 5): a quantized base is merged by requantizing
and the drift report's numbers are what a direct comparison of outputs before and after gives;
`--dense` writes exact 16-bit weights; modules_to_save are folded in; the output loads in plain
transformers."""

import re

import pytest
import torch
from transformers import AutoModelForCausalLM

from lorafit.cli import main
from lorafit.io import load_adapter
from lorafit.lora.inject import lora_layers
from lorafit.merge import probe_ids
from lorafit.model import load_model

NUMBER = r"([0-9.]+(?:e[-+]?\d+)?)"


def merge(capsys, *args) -> tuple[int, str, str]:
    code = main(["merge", *map(str, args)])
    out = capsys.readouterr()
    return code, out.out, out.err


def _bnb_logits(folder, ids):
    """Logits of a bitsandbytes 4-bit checkpoint as transformers + bitsandbytes load it (train mode:
    their CPU eval path first repacks NF4 into a lossier layout; Llama has no dropout)."""
    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(folder, device_map="cpu").train()(ids).logits


def test_nf4_merge_report_matches_a_direct_comparison(files, tmp_path, capsys):
    code, out, _ = merge(capsys, "--model", files / "llama-nf4", "--adapter", files / "adapter", "--out", tmp_path / "m")
    assert code == 0, out
    print(out)
    mean_pct, max_pct = map(float, re.search(rf"mean {NUMBER}%, max {NUMBER}%", out).groups())
    worst = re.search(r"worst layers: (\S+) ", out).group(1)
    logits_pct, logits_max = map(float, re.search(rf"mean relative change {NUMBER}%, max abs change {NUMBER}", out).groups())

    # before: the NF4 base with the adapter on top (exact); after: the checkpoint just written (NF4 codes as saved)
    before, _ = load_model(files / "llama-nf4")
    load_adapter(before, files / "adapter")
    after, _ = load_model(tmp_path / "m")
    g = torch.Generator().manual_seed(123)  # not the report's probe: an independent one, 8x larger
    rel = {}
    with torch.no_grad():
        for path, layer in lora_layers(before):
            x = torch.randn(512, layer.in_features, generator=g)
            exact, got = layer(x), after.get_submodule(path)(x)
            rel[path] = ((got - exact).abs().mean() / exact.abs().mean()).item()
    assert int(re.search(r"merged into (\d+) quantized layers", out).group(1)) == len(rel) == 14
    assert 100 * sum(rel.values()) / len(rel) == pytest.approx(mean_pct, rel=0.15)
    assert 100 * max(rel.values()) == pytest.approx(max_pct, rel=0.25)
    assert rel[worst] >= 0.8 * max(rel.values())  # the worst named is among the worst (rankings of close ones vary)

    ids = probe_ids(before.config.vocab_size)
    with torch.no_grad():
        want, got = before(ids).logits, after(ids).logits
    diff = (got - want).abs()
    assert 100 * (diff.mean() / want.abs().mean()).item() == pytest.approx(logits_pct, rel=1e-2)
    assert diff.max().item() == pytest.approx(logits_max, rel=1e-2)
    torch.testing.assert_close(_bnb_logits(tmp_path / "m", ids), got, rtol=1e-4, atol=1e-4)  # plain transformers


def test_dense_merge_of_an_nf4_base_is_exact_in_bf16(files, tmp_path, capsys):
    code, out, _ = merge(capsys, "--model", files / "llama-nf4", "--adapter", files / "adapter", "--out", tmp_path / "m",
                         "--dense")
    assert code == 0 and "in bfloat16 (the exact merged weights)" in out and "quantized layers" not in out
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert merged.dtype == torch.bfloat16 and "quantization_config" not in merged.config.to_dict()
    exact, _ = load_model(files / "llama-nf4")
    load_adapter(exact, files / "adapter")
    ids = probe_ids(exact.config.vocab_size)
    with torch.no_grad():
        want, got = exact(ids).logits, merged.float()(ids).logits
    assert ((got - want).abs().max() / want.abs().max()).item() < 2e-2  # bf16 rounding of exact weights


@pytest.mark.parametrize("base", ["llama", "llama-nf4"])
def test_modules_to_save_are_folded_in(base, files, tmp_path, capsys):
    code, out, _ = merge(capsys, "--model", files / base, "--adapter", files / "adapter-mts", "--out", tmp_path / "m")
    assert code == 0, out
    model, _ = load_model(files / base)
    load_adapter(model, files / "adapter-mts")
    ids = probe_ids(model.config.vocab_size)
    with torch.no_grad():
        want = model(ids).logits
        got = _bnb_logits(tmp_path / "m", ids) if base.endswith("nf4") else AutoModelForCausalLM.from_pretrained(
            tmp_path / "m")(ids).logits
        trained_head = model.lm_head.copies["default"].weight
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m", device_map="cpu")
    assert torch.equal(loaded.lm_head.weight.float(), trained_head.float())  # the trained copy, not the original
    tol = 0.5 if base.endswith("nf4") else 1e-4  # requantizing q_proj moves the NF4 base a little
    assert (got - want).abs().max().item() < tol


def test_quantize_flag_merges_into_the_qlora_base(files, tmp_path, capsys):
    code, out, _ = merge(capsys, "--model", files / "llama", "--adapter", files / "adapter", "--out", tmp_path / "m",
                         "--quantize", "nf4")
    assert code == 0 and "merged into 14 quantized layers" in out and "bitsandbytes 4-bit" in out
    code, _, err = merge(capsys, "--model", files / "llama", "--adapter", files / "adapter", "--out", tmp_path / "t",
                         "--quantize", "ternary")
    assert code == 2 and err.strip().count("\n") == 0 and "--quantize ternary" in err and not (tmp_path / "t").exists()
