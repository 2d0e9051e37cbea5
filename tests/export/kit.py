"""Export test kit (imported by the tests/export modules): small real tokenizers trained here, tiny random models of every supported family,
and llama.cpp (through its Python binding) to read what we write.

llama_cpp_python is not a dependency of lorafit: CI installs a prebuilt wheel from ../shared/wheels
(see .ci/run); elsewhere the tests that need it are skipped with the reason shown.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

import lorafit as lf
from lorafit.export.vocab import LLAMA3_REGEX, QWEN2_REGEX
from lorafit.train.demo_task import make_dataset

LLAMA_CPP_REASON = ("llama_cpp (llama-cpp-python) is not installed; CI installs it from ../shared/wheels "
                    "(.ci/run, make llama-cpp); locally: pip install ../shared/wheels/llama_cpp_python-*.whl")
# marks a test that runs llama.cpp, so it is skipped before its (sometimes slow) fixtures are built
needs_llama_cpp = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason=LLAMA_CPP_REASON)

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
GEMMA_CHAT = ("{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else "
              "m['role'] }}\n{{ m['content'] }}<end_of_turn>\n{% endfor %}"
              "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")

# words, digits, punctuation, newlines, runs of spaces, accents, CJK and an emoji: what tokenizers disagree on
EXTRA_TEXT = ["Hello, World! It's 2024-05-17; we'll   see...\n\nNew line\ttab", "Ça coûte 12,50 € — naïve café",
              "中文字符 and ✨ emoji", "def f(x):\n    return x ** 2  # comment", "I'M SHOUTING, you're not."]
TEXT = [f"{r['instruction']} {r['input']} -> {r['output']}" for r in make_dataset(200, seed=3)] + EXTRA_TEXT * 20


def bpe_tokenizer(pre: str, vocab_size: int = 700) -> PreTrainedTokenizerFast:
    """A byte-level BPE with the pre-tokenizer llama.cpp calls `pre` (gpt-2, smollm, qwen2, llama-bpe)."""
    tk = Tokenizer(models.BPE())
    bytelevel = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=pre in ("gpt-2", "smollm"))
    tk.pre_tokenizer = {
        "gpt-2": bytelevel,
        "smollm": pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), bytelevel]),
        "qwen2": pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_REGEX), "isolated"), bytelevel]),
        "llama-bpe": pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_REGEX), "isolated"), bytelevel]),
    }[pre]
    tk.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tk.train_from_iterator(TEXT, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                                     initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  unk_token="<|endoftext|>", pad_token="<|endoftext|>")
    tok.chat_template = CHATML
    return tok


def spm_tokenizer(space_prefix: bool = False, vocab_size: int = 700) -> PreTrainedTokenizerFast:
    """A SentencePiece-style BPE (text "▁"-escaped, <0xXX> byte fallback): Gemma's shape, or Llama 2's
    with `space_prefix`. Adds <bos> in front of every encoding, as those tokenizers do."""
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    tk = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    replace = normalizers.Replace(" ", "▁")
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), replace]) if space_prefix else replace
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tk.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if space_prefix else []))
    tk.train_from_iterator(TEXT, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials + byte_tokens,
                                                     show_progress=False, max_token_length=16))
    from tokenizers.processors import TemplateProcessing

    tk.post_processor = TemplateProcessing(single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", 2)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
                                  pad_token="<pad>")
    tok.chat_template = GEMMA_CHAT
    return tok


def _llama(vocab: int) -> LlamaForCausalLM:
    rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                        attention_bias=True, rope_parameters=rope, tie_word_embeddings=False))


def _qwen2(vocab: int) -> Qwen2ForCausalLM:
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                        tie_word_embeddings=False, rope_parameters={"rope_theta": 1e6}))


def _qwen3(vocab: int) -> Qwen3ForCausalLM:
    return Qwen3ForCausalLM(Qwen3Config(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                        max_position_embeddings=256, tie_word_embeddings=True))


def _gemma3(vocab: int) -> Gemma3ForCausalLM:
    # 6 layers: five sliding-window ones (window 4, shorter than the test prompts) and one global one
    rope = {"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}
    return Gemma3ForCausalLM(Gemma3TextConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=4, max_position_embeddings=256,
        rope_parameters=rope, attn_implementation="eager"))


# family -> (model builder, tokenizer builder)
FAMILIES = {
    "llama": (_llama, lambda: bpe_tokenizer("llama-bpe")),
    "qwen2": (_qwen2, lambda: bpe_tokenizer("qwen2")),
    "qwen3": (_qwen3, lambda: bpe_tokenizer("qwen2")),
    "gemma3": (_gemma3, lambda: spm_tokenizer(space_prefix=False)),
}


def tiny_model(family: str, vocab: int, seed: int = 0):
    """A tiny random model of `family`, with norm weights and biases random too (so that their
    layout and Gemma's +1 shift are tested, not hidden behind ones and zeros)."""
    torch.manual_seed(seed)
    model = FAMILIES[family][0](vocab).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
        if family == "gemma3":
            # A trained Gemma's embeddings times sqrt(d) are O(1) and its post-norm gains below one. With
            # the random init (std 0.02, gains 1) each block's renormalised output swamps the residual
            # stream and amplifies any rounding (q8_0 then flips a seventh of the greedy tokens).
            model.get_input_embeddings().weight.normal_(0, model.config.hidden_size ** -0.5)
            for name, p in model.named_parameters():
                if ".post_" in name:
                    p.sub_(0.5)
    return model


def random_adapter(model, seed: int = 1, **options):
    """`model` with a rank-4 adapter (all-linear unless told) whose B is random, so the merge shows."""
    lf.apply_lora(model, lf.LoraConfig(r=4, alpha=8, **{"target_modules": "all-linear", **options}))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


# -- llama.cpp --------------------------------------------------------------------------------
def llama(path, lora=None, f32_cache: bool = True, n_ctx: int = 256):
    """A llama.cpp model over the GGUF at `path` (optionally with a GGUF LoRA), every position's logits
    kept. `f32_cache`: keep the KV cache in f32 too, so an f32 file is compared at f32 throughout."""
    llama_cpp = pytest.importorskip("llama_cpp", reason=LLAMA_CPP_REASON)
    f32 = {"type_k": 0, "type_v": 0} if f32_cache else {}  # GGML_TYPE_F32
    return llama_cpp.Llama(str(path), n_ctx=n_ctx, logits_all=True, verbose=False, n_threads=2, seed=0,
                           lora_path=None if lora is None else str(lora), **f32)


def llama_logits(path, ids: list[int], **kw) -> np.ndarray:
    """(len(ids), vocab) logits llama.cpp computes for `ids`."""
    llm = llama(path, **kw)
    llm.eval(ids)
    logits = np.array(llm.scores[: len(ids)], dtype=np.float32)
    llm.close()
    return logits


def hf_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def rel_max_err(got: np.ndarray, want: np.ndarray) -> float:
    """max |got - want| / max |want|: the relative max error the acceptance bounds are stated in."""
    return float(np.abs(got - want).max() / np.abs(want).max())


# -- a demo-style adapter, trained once per test session -------------------------------------
DEMO_STEPS = 20  # lorafit demo runs 80 steps (LoRA+); 20 at 2e-3 get ~60% of held-out dates right (demo: 95%)
DEMO_LR = 2e-3


def train_demo_adapter(out, steps: int = DEMO_STEPS, lr: float = DEMO_LR, quantize: str | None = None):
    """lorafit demo's recipe, shortened (`lorafit demo --steps 20`, at twice the rate, without LoRA+):
    LoRA r=16 on every projection of the bundled SmolLM2-135M (NF4 with quantize="nf4", as the demo),
    the generated dates task (seed 0), batch 8; 40 of the held-out examples as validation data (the
    fingerprint's probes). Returns (adapter folder, held-out records)."""
    from pathlib import Path

    from lorafit.config import LoraConfig
    from lorafit.model import load_model
    from lorafit.train.data import DataConfig, load_data
    from lorafit.train.demo_task import make_splits, write_jsonl
    from lorafit.train.trainer import TrainConfig, Trainer

    out = Path(out)
    torch.manual_seed(0)
    train_records, eval_records = make_splits(600, 40, seed=0)
    train_path = write_jsonl(out / "data" / "train.jsonl", train_records)
    val_path = write_jsonl(out / "data" / "val.jsonl", eval_records)
    model, tokenizer = load_model(None, quantize=quantize)
    splits = load_data(tokenizer, DataConfig(path=str(train_path), val_path=str(val_path), max_seq_length=256))
    config = TrainConfig(output_dir=str(out), lora=LoraConfig(r=16, alpha=16), max_steps=steps, batch_size=8,
                         learning_rate=lr, warmup_ratio=0.1, seed=0)
    Trainer(config, model, tokenizer, splits.train, splits.val).train()
    return out / "adapter", eval_records
