"""What each serving engine accepts, checked on the adapter folder before anyone deploys it.

Every failed check is one line saying what to change. The rules, from each engine's own loader:

    vllm       (vllm/lora/peft_helper.py, PEFTHelper.validate_legal) a LoRA adapter only; the largest rank
               (r and rank_pattern) at most --max-lora-rank (default 16; vLLM accepts 1, 8, 16, 32, 64,
               128, 256, 320, 512); no DoRA; no trained bias; no modules_to_save (vLLM takes them only for
               classification heads); LoRA on linear layers, not on embeddings; no added tokens
    sglang     the same adapter rules; the rank bound only when --max-lora-rank is given (SGLang
               otherwise sizes it from the adapters it loads)
    llama.cpp  a GGUF LoRA (lorafit.export.lora_gguf): plain A/B pairs on tensors llama.cpp's graph of the
               base architecture has; no DoRA, embeddings, modules_to_save, trained biases, (IA)³ or
               AdaLoRA, no adapter on an output head tied to the embeddings
    ollama     llama.cpp's rules (Ollama applies one GGUF LoRA per model, ADAPTER), then a Modelfile
               (lorafit.verify.modelfile)
"""

from __future__ import annotations

import json
from pathlib import Path

from lorafit.errors import LorafitError
from lorafit.export.arch import family_for
from lorafit.export.layout import NameMap
from lorafit.export.lora_gguf import check_lora_exportable, plan_lora
from lorafit.lora.state import AdapterState

TARGETS = ("vllm", "sglang", "llama.cpp", "ollama")
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
VLLM_DEFAULT_RANK = 16
_EMBEDDINGS = ("embed_tokens", "wte", "embed_in", "word_embeddings", "lm_head", "embed_out", "output")


def added_tokens(folder: Path) -> list[str]:
    """Tokens the adapter folder adds to the base's vocabulary (a tokenizer saved with new tokens)."""
    path = folder / "added_tokens.json"
    if not path.is_file():
        return []
    try:
        return sorted(json.loads(path.read_text()))
    except (OSError, ValueError):
        return ["(unreadable added_tokens.json)"]


def check_adapter_engine(engine: str, folder: Path, peft: dict, state: AdapterState,
                         max_lora_rank: int | None) -> list[str]:
    """vLLM's or SGLang's rules (module docstring) on the adapter's config (`peft`: adapter_config.json as
    written) and weights; one line per failed check."""
    name = {"vllm": "vLLM", "sglang": "SGLang"}[engine]
    merge = "or merge the adapter (lorafit merge) and serve the merged model"
    if peft.get("peft_type", "LORA") != "LORA":
        return [f"{name} loads LoRA adapters only and this one is {peft['peft_type']}: train a LoRA adapter, {merge}"]
    out = []
    ranks = [int(peft.get("r", 0)), *(int(r) for r in (peft.get("rank_pattern") or {}).values())]
    limit = max_lora_rank if max_lora_rank is not None else (VLLM_DEFAULT_RANK if engine == "vllm" else None)
    if limit is not None and max(ranks) > limit:
        fits = next((r for r in VLLM_RANKS if r >= max(ranks)), None) if engine == "vllm" else max(ranks)
        start = f"start {name} with --max-lora-rank {fits}, or " if fits else ""
        out.append(f"rank {max(ranks)} is above {name}'s max_lora_rank {limit}: {start}train with lora.r <= {limit}")
    if peft.get("use_dora"):
        out.append(f"DoRA (use_dora: true): {name} does not support DoRA; train without lora.use_dora, {merge}")
    if peft.get("bias", "none") != "none" or state.biases:
        out.append(f"the adapter trains biases (bias: {peft.get('bias')}): {name} loads no adapter bias; train with "
                   f"lora.bias: none, {merge}")
    if peft.get("modules_to_save"):
        where = [m for m in peft["modules_to_save"] if m.split(".")[-1] in _EMBEDDINGS]
        what = f"on the embeddings or the head ({', '.join(where)})" if where else f"({', '.join(peft['modules_to_save'])})"
        out.append(f"modules_to_save {what}: {name} loads low-rank weights only; train without modules_to_save, {merge}")
    embedded = sorted(p for p, e in state.layers.items() if "embedding_A" in e)
    if embedded:
        out.append(f"LoRA on embeddings ({', '.join(embedded)}): {name} applies adapters to linear layers; drop them "
                   f"from target_modules, {merge}")
    tokens = added_tokens(folder)
    if tokens:
        out.append(f"the adapter adds {len(tokens)} token(s) ({', '.join(tokens[:3])}): {name} serves the base's "
                   f"vocabulary only; train without new tokens, {merge}")
    return out


def check_llama_cpp(peft: dict, config, state: AdapterState, base_config, source: str) -> list[str]:
    """Whether the adapter converts to a GGUF LoRA llama.cpp applies to a GGUF of the base (one line, or none)."""
    if peft.get("peft_type", "LORA") != "LORA" or state.ia3 or state.svd or state.experts:
        return [f"a GGUF LoRA holds plain LoRA A/B pairs and this is {peft.get('peft_type', 'a MoE-expert LoRA')}: "
                "export the merged model instead (lorafit export --format gguf)"]
    try:
        family = family_for(base_config)
        check_lora_exportable(state, source, bool(getattr(base_config, "tie_word_embeddings", False)))
        plan_lora(state, config, NameMap(family, base_config), "f32")  # every adapted tensor has a GGUF name
    except LorafitError as e:
        return [str(e)]
    return []


def check_target(target: str, folder: Path, peft: dict, config, state: AdapterState, base_config,
                 max_lora_rank: int | None) -> list[str]:
    """The failed checks of `target` (TARGETS), one line each."""
    if target in ("vllm", "sglang"):
        return check_adapter_engine(target, folder, peft, state, max_lora_rank)
    if target in ("llama.cpp", "ollama"):
        return check_llama_cpp(peft, config, state, base_config, str(folder))
    raise LorafitError(f"--target {target}: unknown; use one of {', '.join(TARGETS)}")
