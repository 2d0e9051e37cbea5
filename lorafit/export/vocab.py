"""The tokenizer as GGUF metadata, read from an HF fast tokenizer (its tokenizer.json).

llama.cpp tokenizes from these keys alone (gguf-py `Keys.Tokenizer`):

    tokenizer.ggml.model        "gpt2": byte-level BPE (SmolLM2, Qwen, Llama 3); "llama": SentencePiece-style
                                BPE over "▁"-escaped text with <0xXX> byte fallback (Gemma, Llama 2)
    tokenizer.ggml.pre          the pre-tokenizer (the regex split before BPE), by llama.cpp's name
    tokenizer.ggml.tokens       every id's text, in id order; rows of the embedding without a token get "[PADn]"
    tokenizer.ggml.token_type   1 normal, 2 unknown, 3 control (special), 4 user-defined, 5 unused, 6 byte
    tokenizer.ggml.merges       "a b" merge rules in rank order (gpt2 only)
    tokenizer.ggml.scores       merge priority for "llama": higher merges first (here: minus the merge rank)
    tokenizer.ggml.{bos,eos,unknown,padding}_token_id, add_bos_token, add_eos_token, add_space_prefix
    tokenizer.chat_template     the Jinja chat template, so chat completion formats prompts as in training

The pre-tokenizer is identified from tokenizer.json's structure (the same split rules give the same
tokens). Known ones, with llama.cpp's names:

    ByteLevel(use_regex)                        gpt-2       GPT-2's regex
    Digits(individual) + ByteLevel(use_regex)   smollm      SmolLM / SmolLM2
    Split(Qwen2 regex) + ByteLevel              qwen2       Qwen2, Qwen2.5, Qwen3
    Split(Llama 3 regex) + ByteLevel            llama-bpe   Llama 3.x

Anything else is refused with the structure named: a wrong pre-tokenizer still loads, and then
splits text differently from the model's training.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from gguf import GGUFWriter, TokenType

from lorafit.errors import LorafitError

_CONTRACTIONS = "(?i:'s|'t|'re|'ve|'m|'ll|'d)"
_TAIL = r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
QWEN2_REGEX = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}" + _TAIL
LLAMA3_REGEX = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}" + _TAIL

PRE_TOKENIZERS: dict[tuple[str, ...], str] = {
    ("bytelevel+regex",): "gpt-2",
    ("digits", "bytelevel+regex"): "smollm",
    (f"split:{QWEN2_REGEX}", "bytelevel"): "qwen2",
    (f"split:{LLAMA3_REGEX}", "bytelevel"): "llama-bpe",
}
_BYTE_TOKEN = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


@dataclass
class Vocab:
    model: str  # "gpt2" or "llama"
    pre: str | None  # llama.cpp pre-tokenizer name (gpt2 only)
    tokens: list[str]
    types: list[int]
    merges: list[str]
    scores: list[float] | None
    special_ids: dict[str, int]  # "bos" / "eos" / "unk" / "pad" -> id
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool | None
    chat_template: str | None


def _steps(node: dict | None) -> list[str]:
    """A pre-tokenizer as a flat list of comparable steps."""
    if node is None:
        return []
    kind = node.get("type")
    if kind == "Sequence":
        return [s for p in node["pretokenizers"] for s in _steps(p)]
    if kind == "ByteLevel" and not node.get("add_prefix_space", False):
        return ["bytelevel+regex" if node.get("use_regex", True) else "bytelevel"]
    if kind == "Digits" and node.get("individual_digits"):
        return ["digits"]
    if kind == "Split" and node.get("behavior") == "Isolated" and not node.get("invert"):
        pattern = node["pattern"]
        return [f"split:{pattern.get('Regex', re.escape(pattern.get('String', '')))}"]
    return [json.dumps(node, sort_keys=True)]


def pre_tokenizer_name(data: dict) -> str:
    steps = tuple(_steps(data.get("pre_tokenizer")))
    if steps not in PRE_TOKENIZERS:
        raise LorafitError(f"tokenizer: pre-tokenizer {' + '.join(s[:60] for s in steps) or 'none'} has no llama.cpp "
                           f"equivalent lorafit knows (known: {', '.join(PRE_TOKENIZERS.values())})")
    normalizer = data.get("normalizer")
    if normalizer is not None and normalizer.get("type") != "NFC":
        raise LorafitError(f"tokenizer: normalizer {normalizer.get('type')} before byte-level BPE has no llama.cpp equivalent")
    return PRE_TOKENIZERS[steps]


def _is_byte_level(data: dict) -> bool:
    return "ByteLevel" in json.dumps(data.get("pre_tokenizer")) or "ByteLevel" in json.dumps(data.get("decoder"))


def _space_prefix(data: dict) -> bool:
    """Whether an SPM-style tokenizer puts "▁" before the text (Llama 2 yes, Gemma no)."""
    text = json.dumps([data.get("normalizer"), data.get("pre_tokenizer")])
    if '"Prepend"' in text:
        return True
    return '"Metaspace"' in text and '"prepend_scheme": "never"' not in text and '"add_prefix_space": false' not in text


def _merge_text(m: str | list[str]) -> str:
    return m if isinstance(m, str) else " ".join(m)


def _merge_scores(merges: list[str], vocab: dict[str, int], n: int) -> list[float]:
    """Score of each token for llama.cpp's SPM merging: minus the rank of the first merge producing it."""
    scores = [0.0] * n
    seen: set[int] = set()
    for rank, merge in enumerate(merges):
        token_id = vocab.get(merge.replace(" ", "", 1))
        if token_id is not None and token_id not in seen:
            seen.add(token_id)
            scores[token_id] = -float(rank + 1)
    return scores


def read_vocab(tokenizer, n_vocab: int) -> Vocab:
    """The GGUF tokenizer of an HF fast tokenizer, padded to the model's `n_vocab` embedding rows."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise LorafitError(f"tokenizer {type(tokenizer).__name__}: only fast tokenizers (tokenizer.json) export to GGUF")
    data = json.loads(backend.to_str())
    model = data["model"]
    if model.get("type") != "BPE":
        raise LorafitError(f"tokenizer: a {model.get('type')} model; GGUF export supports BPE tokenizers")
    vocab: dict[str, int] = model["vocab"]
    added = {a["id"]: a for a in data.get("added_tokens", [])}
    size = max([*vocab.values(), *added, -1]) + 1
    if size > n_vocab:
        raise LorafitError(f"tokenizer has {size} tokens but the model's embedding only {n_vocab} rows; "
                           "they do not belong together")
    if _is_byte_level(data):
        kind, pre, space = "gpt2", pre_tokenizer_name(data), None
    elif model.get("byte_fallback"):
        kind, pre, space = "llama", None, _space_prefix(data)
    else:
        raise LorafitError("tokenizer: BPE that is neither byte-level nor byte-fallback; llama.cpp has no such tokenizer")

    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    types = [int(TokenType.UNUSED)] * n_vocab
    unk = model.get("unk_token")
    for text, i in vocab.items():
        tokens[i] = text
        if kind == "llama" and _BYTE_TOKEN.match(text):
            types[i] = int(TokenType.BYTE)
        elif text == unk:
            types[i] = int(TokenType.UNKNOWN)
        else:
            types[i] = int(TokenType.NORMAL)
    for i, a in added.items():
        tokens[i] = a["content"]
        if a["content"] == unk:
            types[i] = int(TokenType.UNKNOWN)
        elif not (kind == "llama" and _BYTE_TOKEN.match(a["content"])):
            types[i] = int(TokenType.CONTROL if a.get("special") else TokenType.USER_DEFINED)

    merges = [_merge_text(m) for m in model.get("merges", [])]
    special_ids = {k: i for k in ("bos", "eos", "unk", "pad") if (i := getattr(tokenizer, f"{k}_token_id", None)) is not None}
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    template = tokenizer.chat_template if isinstance(getattr(tokenizer, "chat_template", None), str) else None
    return Vocab(kind, pre, tokens, types, merges if kind == "gpt2" else [],
                 _merge_scores(merges, vocab, n_vocab) if kind == "llama" else None, special_ids,
                 add_bos="bos" in special_ids and probe[:1] == [special_ids["bos"]],
                 add_eos="eos" in special_ids and probe[-1:] == [special_ids["eos"]],
                 add_space_prefix=space, chat_template=template)


def write_vocab(w: GGUFWriter, v: Vocab) -> None:
    w.add_tokenizer_model(v.model)
    if v.pre is not None:
        w.add_tokenizer_pre(v.pre)
    w.add_token_list(v.tokens)
    w.add_token_types(v.types)
    if v.scores is not None:
        w.add_token_scores(v.scores)
    if v.merges:
        w.add_token_merges(v.merges)
    adders = {"bos": w.add_bos_token_id, "eos": w.add_eos_token_id, "unk": w.add_unk_token_id,
              "pad": w.add_pad_token_id}
    for key, token_id in v.special_ids.items():
        adders[key](token_id)
    w.add_add_bos_token(v.add_bos)
    w.add_add_eos_token(v.add_eos)
    if v.add_space_prefix is not None:
        w.add_add_space_prefix(v.add_space_prefix)
    if v.chat_template:
        w.add_chat_template(v.chat_template)
