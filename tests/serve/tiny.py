"""A tiny Llama with a byte-level BPE tokenizer trained in memory: a servable model folder in a second.

Random weights generate random tokens, which is all the scheduler tests need: every token is a
fresh argmax, so any mix-up of rows, adapters, positions or cache columns changes the output.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import lorafit as lf
from lorafit.lora.inject import lora_layers

TEXT = ["the quick brown fox jumps over the lazy dog", "adapters share one base model in a batch",
        "a server answers many clients at once", "hello world, tokens stream back as they come"]
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
ADAPTERS = {"alpha": 4, "beta": 8, "gamma": 2, "delta": 4}  # name -> rank


def make_tokenizer() -> PreTrainedTokenizerFast:
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<pad>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(TEXT, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>", eos_token="<eos>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def make_model(tokenizer, seed: int = 0, context: int = 512) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=None, tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


def randomize(model, adapter: str, seed: int, std: float = 0.3) -> None:
    """A trained-looking adapter: random A and B, large enough to change the greedy tokens."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            if adapter in layer.lora_A:
                for p in (layer.lora_A[adapter], layer.lora_B[adapter]):
                    p.copy_(torch.randn(p.shape, generator=g) * std)


def save_adapter(model_dir: Path, out: Path, rank: int, seed: int, **config) -> Path:
    """An adapter for the model in `model_dir`, written in PEFT's format to `out`."""
    model = LlamaForCausalLM.from_pretrained(model_dir)
    lf.apply_lora(model, lf.LoraConfig(r=rank, **{"target_modules": "all-linear", **config}))
    randomize(model, "default", seed)
    return lf.save_adapter(model, out)


def build(root: Path, context: int = 512) -> tuple[Path, dict[str, Path]]:
    """root/model (tiny Llama + tokenizer) and root/adapters/<name> for each of ADAPTERS."""
    tokenizer = make_tokenizer()
    model_dir = root / "model"
    make_model(tokenizer, context=context).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    adapters = {name: save_adapter(model_dir, root / "adapters" / name, r, seed=100 + i)
                for i, (name, r) in enumerate(ADAPTERS.items())}
    return model_dir, adapters
