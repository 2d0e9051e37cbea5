"""The tokenizer metadata: llama.cpp, reading only what we wrote, splits text into the same ids as
the HF tokenizer, for every tokenizer shape we export (and refuses the ones we cannot express)."""

import json

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from lorafit.errors import LorafitError
from lorafit.export import export_gguf
from lorafit.export.vocab import read_vocab
from tests.export.kit import EXTRA_TEXT, bpe_tokenizer, llama, needs_llama_cpp, spm_tokenizer

TEXTS = EXTRA_TEXT + ["Convert the date to ISO format (YYYY-MM-DD). Mar 3rd, '98", "  leading spaces\n\n\ntrailing  ",
                      "<|im_start|>user\nhi<|im_end|>", "numbers 1234567 and 3.14159", "ünïcödé ÄÖÜ ß"]


def _gguf_with(tokenizer, tmp_path, extra_rows: int = 0):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer) + extra_rows, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    path = tmp_path / "tok.gguf"
    export_gguf(model, tokenizer, path, "f16")
    return path


@needs_llama_cpp
@pytest.mark.parametrize("kind", ["gpt-2", "smollm", "qwen2", "llama-bpe", "spm", "spm-prefix"])
def test_llama_cpp_tokenizes_like_transformers(kind, tmp_path):
    tok = spm_tokenizer(space_prefix=kind == "spm-prefix") if kind.startswith("spm") else bpe_tokenizer(kind)
    path = _gguf_with(tok, tmp_path, extra_rows=3)  # padded embedding rows, as Qwen's are
    llm = llama(path)
    meta = llm.metadata
    assert meta["tokenizer.ggml.model"] == ("llama" if kind.startswith("spm") else "gpt2")
    if not kind.startswith("spm"):
        assert meta["tokenizer.ggml.pre"] == kind
    add_bos = meta["tokenizer.ggml.add_bos_token"] == "true"
    assert add_bos == kind.startswith("spm")  # the SPM test tokenizers put <bos> first, the BPE ones nothing
    for text in TEXTS:
        want = tok(text)["input_ids"]
        got = llm.tokenize(text.encode(), add_bos=add_bos, special=True)
        assert got == want, (text, got, want)
        assert llm.detokenize(want, special=True).decode() == tok.decode(want), text
    assert llm.n_vocab() == len(tok) + 3
    llm.close()


@needs_llama_cpp
def test_real_smollm2_tokenizer(smollm2_dir, tmp_path):
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    vocab = read_vocab(tok, 49152)
    assert vocab.model == "gpt2" and vocab.pre == "gpt-2"  # what this tokenizer.json's pre-tokenizer is
    assert vocab.tokens[2] == "<|im_end|>" and vocab.types[2] == 3  # control
    assert vocab.special_ids["eos"] == 2 and not vocab.add_bos and "<|im_start|>" in vocab.chat_template
    assert len(vocab.merges) == 48900 and vocab.merges[0] == "Ġ t"
    path = _gguf_with(tok, tmp_path)
    llm = llama(path)
    for text in TEXTS:
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == tok(text)["input_ids"], text
    llm.close()


def test_unknown_pre_tokenizer_is_refused_with_its_shape():
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.ByteLevel(use_regex=False)])
    tk.train_from_iterator(["some text here"], trainers.BpeTrainer(vocab_size=300, show_progress=False,
                                                                   initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk)
    with pytest.raises(LorafitError, match=r"pre-tokenizer .*Whitespace.* has no llama.cpp equivalent"):
        read_vocab(tok, len(tok))


def test_tokenizer_larger_than_the_embedding_is_refused():
    tok = bpe_tokenizer("gpt-2", vocab_size=300)
    with pytest.raises(LorafitError, match="do not belong together"):
        read_vocab(tok, 100)


def test_spm_scores_follow_merge_order():
    tok = spm_tokenizer()
    vocab = read_vocab(tok, len(tok))
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    first, second = ("".join(m) for m in merges[:2])
    ids = tok.backend_tokenizer.get_vocab()
    assert vocab.scores[ids[first]] > vocab.scores[ids[second]] > min(vocab.scores)
    assert vocab.types[ids["<0x41>"]] == 6 and vocab.types[ids["<unk>"]] == 2 and vocab.types[ids["<bos>"]] == 3
