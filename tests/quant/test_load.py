"""Quantized loading of real checkpoints: bitsandbytes' on-disk format both ways, peak memory while
loading, QLoRA and ternary LoRA training, merging into a quantized base."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

import lorafit as lf
from lorafit.merge import format_report, merge_quantized, merge_to_dense
from lorafit.model import load_model
from lorafit.quant.linear import NF4Linear, weight_storage_bytes
from lorafit.quant.load import load_quantized, save_bnb_checkpoint
from lorafit.train.data import DataConfig, load_data
from lorafit.train.demo_task import make_dataset, write_jsonl
from lorafit.train.trainer import TrainConfig, Trainer

ROOT = Path(__file__).resolve().parents[2]
BNB = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                         bnb_4bit_compute_dtype=torch.float32)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 49152, (2, 16), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def bnb_checkpoint(smollm2_dir, tmp_path_factory):
    """SmolLM2-135M quantized and saved 4-bit by transformers + bitsandbytes."""
    out = tmp_path_factory.mktemp("bnb")
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, quantization_config=BNB, device_map="cpu")
    model.save_pretrained(out)
    return out, _exact_bnb(model)


def _exact_bnb(model):
    """bitsandbytes' CPU inference (eval mode, AVX512-BF16 CPUs) first repacks NF4 weights into a
    lossy bf16-scaled layout; in train mode it computes with its stored NF4 codes. Llama has no
    dropout, so train mode changes nothing else."""
    return model.train()


def test_bnb_checkpoint_loads_with_identical_logits(bnb_checkpoint, ids):
    folder, bnb_model = bnb_checkpoint
    ours = load_quantized(folder)
    assert sum(isinstance(m, NF4Linear) for m in ours.modules()) == 30 * 7
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, bnb_model(ids).logits)


def test_our_nf4_checkpoint_loads_in_bitsandbytes(smollm2_dir, bnb_checkpoint, ids, tmp_path):
    ours = load_quantized(smollm2_dir, "nf4")
    save_bnb_checkpoint(ours, tmp_path)
    theirs = _exact_bnb(AutoModelForCausalLM.from_pretrained(tmp_path, device_map="cpu"))
    assert type(theirs.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    with torch.no_grad():
        assert torch.equal(theirs(ids).logits, ours(ids).logits)
        assert torch.equal(ours(ids).logits, bnb_checkpoint[1](ids).logits)  # same bytes as bnb quantizing


def test_missing_statistics_name_the_key(bnb_checkpoint, tmp_path):
    folder, _ = bnb_checkpoint
    tensors = load_file(folder / "model.safetensors")
    key = "model.layers.3.self_attn.k_proj.weight.absmax"
    del tensors[key]
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(lf.LorafitError, match="model.layers.3.self_attn.k_proj"):
        load_quantized(tmp_path)


PEAK = """
import sys, gc, torch
def rss_mib():
    return int(open('/proc/self/statm').read().split()[1]) * 4096 / 2**20
from transformers import AutoModelForCausalLM, BitsAndBytesConfig
import transformers.models.llama.modeling_llama  # code imports are not the model's memory
import accelerate, bitsandbytes, lorafit.quant.load
gc.collect(); before = rss_mib()
if sys.argv[1] == 'lorafit':
    model = lorafit.quant.load.load_quantized(sys.argv[2], 'nf4')  # the model half of load_model(quantize='nf4')
else:
    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type='nf4', bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(sys.argv[2], quantization_config=cfg, device_map='cpu')
# VmHWM, not ru_maxrss: the latter keeps the high-water mark of the parent we were forked from
peak = int(open('/proc/self/status').read().split('VmHWM:')[1].split()[0]) / 1024
print(peak - before)
"""


def _peak_load_mib(side: str, folder: Path) -> float:
    out = subprocess.run([sys.executable, "-c", PEAK, side, str(folder)], capture_output=True, text=True,
                         cwd=ROOT, check=True, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin",
                                                    "OMP_NUM_THREADS": "1"})
    return float(out.stdout.strip().splitlines()[-1])


def test_peak_memory_while_loading(smollm2_dir):
    """Peak RSS growth of loading SmolLM2-135M in NF4: below its fp32 size and below transformers + bnb."""
    config = json.loads((smollm2_dir / "config.json").read_text())
    fp32_mib = 4 * 134_515_008 / 2**20
    assert config["hidden_size"] == 576
    ours, theirs = _peak_load_mib("lorafit", smollm2_dir), _peak_load_mib("bnb", smollm2_dir)
    print(f"peak load growth: lorafit {ours:.0f} MiB, transformers+bnb {theirs:.0f} MiB, fp32 model {fp32_mib:.0f} MiB")
    assert ours < fp32_mib
    assert ours < theirs


def _date_samples(tokenizer, tmp_path, n=64):
    path = write_jsonl(tmp_path / "dates.jsonl", make_dataset(n, seed=1))
    return load_data(tokenizer, DataConfig(path=str(path))).train


def test_qlora_training_on_cpu_lowers_the_loss(smollm2_dir, tmp_path):
    """The real SmolLM2 weights in NF4, cut to its first 6 blocks to keep CI fast (30 steps)."""
    model, tokenizer = load_model(smollm2_dir, quantize="nf4")
    stored, params = weight_storage_bytes(model)
    assert stored / params <= 0.6  # packed codes + statistics, per base parameter of the quantized layers
    model.model.layers = model.model.layers[:6]
    model.config.num_hidden_layers = 6
    config = TrainConfig(output_dir=str(tmp_path), lora=lf.LoraConfig(r=8, alpha=16, target_modules="all-linear"),
                         max_steps=30, batch_size=4, learning_rate=1e-3, warmup_ratio=0.1)
    history = Trainer(config, model, tokenizer, _date_samples(tokenizer, tmp_path)).train()
    first, last = sum(h["loss"] for h in history[:5]) / 5, sum(h["loss"] for h in history[-5:]) / 5
    assert last < 0.7 * first, (first, last)
    assert all(isinstance(layer.base_layer, NF4Linear) for _, layer in lf.lora.inject.lora_layers(model))


def test_ternary_lora_trains_and_packs(tmp_path):
    from transformers import AutoTokenizer

    from lorafit.model import default_gguf
    from lorafit.quant.apply import quantize_model
    from tests.train.test_trainer import tiny_llama

    gguf = default_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = quantize_model(tiny_llama(), "ternary")
    config = TrainConfig(output_dir=str(tmp_path), lora=lf.LoraConfig(r=8, target_modules="all-linear"),
                         max_steps=30, batch_size=8, learning_rate=3e-3, warmup_ratio=0.0)
    history = Trainer(config, model, tokenizer, _date_samples(tokenizer, tmp_path)).train()
    assert sum(h["loss"] for h in history[-5:]) < sum(h["loss"] for h in history[:5])


def test_merge_into_nf4_reports_its_error_and_dense_export_is_exact(ids):
    from lorafit.quant.apply import quantize_model
    from tests.train.test_trainer import tiny_llama

    def adapted():
        model = quantize_model(tiny_llama(), "nf4")
        lf.apply_lora(model, lf.LoraConfig(r=4, init="random"))
        return model

    with torch.no_grad():
        expected = adapted()(ids).logits
        report = merge_quantized(model := adapted())
        assert len(report) == 14 and all(e.max_abs > 0 for e in report)
        assert "quantized layers" in format_report(report)
        merged_logits = model(ids).logits
        assert 0 < (merged_logits - expected).abs().max() < 0.5  # requantizing loses a little, not all
        dense = merge_to_dense(adapted(), dtype=torch.float32)
        assert not any(isinstance(m, (lf.LoraLayer, NF4Linear)) for m in dense.modules())
        torch.testing.assert_close(dense(ids).logits, expected, atol=1e-4, rtol=0)
