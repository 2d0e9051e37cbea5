"""Which modules to adapt: per-family defaults and name matching.

A user who names no target gets every projection of attention and MLP for the families we know,
since adapting all linear layers is what works best in practice (QLoRA, Dettmers et al. 2023).
"""

from __future__ import annotations

import re
import warnings

from torch import nn

from lorafit.errors import LorafitError
from lorafit.lora.base import is_adaptable, is_linear
from lorafit.lora.layer import LoraLayer, inside_wrapper
from lorafit.modules import path_matches, read_by_weight

_LLAMA = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
_ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
_MLP = ["gate_proj", "up_proj", "down_proj"]
# Linear attention (gated DeltaNet): the projections in and out of it. Its per-head decay and beta gates
# (in_proj_a / in_proj_b, in_proj_ba: a few outputs per head) stay frozen, as does MoE routing; 3-D experts
# are adapted through target_parameters.
_QWEN3_5 = [*_ATTENTION, "in_proj_qkv", "in_proj_z", "out_proj", *_MLP]

DEFAULT_TARGETS: dict[str, list[str]] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "mixtral": ["q_proj", "k_proj", "v_proj", "o_proj", "w1", "w2", "w3"],
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "gemma": _LLAMA,
    "gemma2": _LLAMA,
    "gemma3_text": _LLAMA,
    "gemma3": _LLAMA,
    "olmo": _LLAMA,
    "olmo2": _LLAMA,
    "olmo3": _LLAMA,
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "phi": ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"],
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "falcon": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "bert": ["query", "key", "value", "dense"],
    "roberta": ["query", "key", "value", "dense"],
    "gemma4": _LLAMA,
    "gemma4_text": _LLAMA,
    "qwen3_5": _QWEN3_5,
    "qwen3_5_text": _QWEN3_5,
    "qwen3_5_moe": _QWEN3_5,  # with the shared expert's gate/up/down
    "qwen3_5_moe_text": _QWEN3_5,
    # no shared-expert gate/up/down: PEFT (>= 0.19 on transformers 5) reads those names on qwen3_next as the
    # fused experts (target_parameters), so an adapter naming them would load differently there
    "qwen3_next": [*_ATTENTION, "in_proj_qkvz", "out_proj"],
    "gpt_oss": _ATTENTION,  # its MLP is experts only
    "llama4": _LLAMA,  # dense MLP layers and the shared expert
    "llama4_text": _LLAMA,
    "smollm3": _LLAMA,
    "ministral3": _LLAMA,
    "mistral3": _LLAMA,
    # attention, the Mamba-2 input projection, the shared MLP (no router; not out_proj: modules.read_by_weight)
    "granitemoehybrid": [*_ATTENTION, "in_proj", "input_linear", "output_linear"],
    # short convolutions' in/out projections, attention (its output is out_proj too), the SwiGLU MLP
    "lfm2": ["q_proj", "k_proj", "v_proj", "out_proj", "in_proj", "w1", "w2", "w3"],
}

_LAYER_INDEX = re.compile(r"\.(?:layers|h|layer|blocks|block)\.(\d+)(?:\.|$)")


def default_targets(model: nn.Module) -> list[str] | str:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return DEFAULT_TARGETS.get(model_type, "all-linear")


def name_matches(name: str, targets: list[str] | str) -> bool:
    """PEFT's rules: a list entry matches a path equal to it or ending in '.entry'; a string is a
    regex over the full path."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return path_matches(name, targets)


def layer_index(name: str) -> int | None:
    m = _LAYER_INDEX.search(name)
    return int(m.group(1)) if m else None


def find_targets(
    model: nn.Module, targets: list[str] | str | None, layers_to_transform: list[int] | None = None,
    wrapper: type[nn.Module] = LoraLayer,
) -> list[str]:
    """Paths of the modules to adapt, in model order. Fails (naming the linear modules the model
    has) when nothing matches or a matched module is of a kind we cannot adapt. A module already
    wrapped by `wrapper` (the adapter layer class of the method asking) counts as its base; one wrapped
    by another method's layer cannot be adapted again."""
    if targets is None:
        targets = default_targets(model)
    output_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    found, unsupported = [], []
    for name, module in model.named_modules():
        if not name or inside_wrapper(name):
            continue
        base = module.base_layer if isinstance(module, wrapper) else module  # wrapped: matched by its own path
        if targets == "all-linear":
            hit = is_linear(base) and module is not output_head
        else:
            hit = name_matches(name, targets)
        if not hit:
            continue
        if layers_to_transform is not None and layer_index(name) not in layers_to_transform:
            continue
        if is_adaptable(base):
            found.append(name)
        elif targets != "all-linear":
            unsupported.append(f"{name} ({type(module).__name__})")
    if unsupported:
        raise LorafitError(
            f"target_modules matched module(s) lorafit cannot adapt: {', '.join(unsupported[:5])}; "
            "adapt Linear, Conv1D or Embedding modules (or list them in modules_to_save)"
        )
    if not found:
        raise LorafitError(
            f"target_modules {targets!r} matched no module of {type(model).__name__}"
            + (f" in layers {layers_to_transform}" if layers_to_transform is not None else "")
            + f"; its linear modules are: {', '.join(linear_names(model))}"
        )
    if isinstance(targets, list):  # one list may serve several families, but a typo must not pass unseen
        names = [name for name, _ in model.named_modules() if name and not inside_wrapper(name)]
        unmatched = [t for t in targets if not any(path_matches(name, [t]) for name in names)]
        if unmatched:
            warnings.warn(f"target_modules {unmatched} match no module of {type(model).__name__} (the others are "
                          f"adapted); its linear modules are: {', '.join(linear_names(model))}", stacklevel=3)
    return found


def check_trainable(model: nn.Module, paths: list[str]) -> None:
    """One line when a module about to be trained with LoRA is one its parent reads by weight in training
    (`lorafit.modules.read_by_weight`): the adapter would not be trained."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    read = read_by_weight(model)
    bad = [p for p in paths if path_matches(p, read)]
    if bad:
        raise LorafitError(f"{model_type}: {bad[0]} is read by weight in a fused training kernel (its parent never "
                           f"calls it), so a LoRA there would not train; leave {', '.join(read)} out of target_modules")


def linear_names(model: nn.Module) -> list[str]:
    """Distinct short names of the model's linear modules (what a user would put in target_modules)."""
    seen: dict[str, None] = {}
    for name, module in model.named_modules():
        if is_linear(getattr(module, "base_layer", module)) and not inside_wrapper(name):
            seen[name.rsplit(".", 1)[-1]] = None
    return list(seen)


# Short target names for ablations (`lorafit ablate --grid lora.target_modules=q|qk|qkv|qkvo|mlp|all`): each
# letter is one attention projection, "mlp" the feed-forward ones, "all" both; the family says which modules.
SHORT_TARGETS = {"q": ["q"], "qk": ["q", "k"], "qkv": ["q", "k", "v"], "qkvo": ["q", "k", "v", "o"],
                 "mlp": ["mlp"], "all": ["q", "k", "v", "o", "mlp"]}
_LLAMA_PARTS = {"q": ["q_proj"], "k": ["k_proj"], "v": ["v_proj"], "o": ["o_proj"],
                "mlp": ["gate_proj", "up_proj", "down_proj"]}
FAMILY_PARTS: dict[str, dict[str, list[str]]] = {
    **{family: _LLAMA_PARTS for family in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "olmo", "olmo3",
                                           "gemma4_text", "smollm3", "ministral3", "llama4_text")},
    "mixtral": {**_LLAMA_PARTS, "mlp": ["w1", "w2", "w3"]},
    "opt": {**_LLAMA_PARTS, "o": ["out_proj"], "mlp": ["fc1", "fc2"]},
    "phi": {**_LLAMA_PARTS, "o": ["dense"], "mlp": ["fc1", "fc2"]},
}


def short_targets(model_type: str | None, short: str) -> list[str]:
    """The module names a short target name (SHORT_TARGETS) means in the family `model_type`."""
    if short not in SHORT_TARGETS:
        raise LorafitError(f"short target name {short!r} is unknown; use one of {', '.join(SHORT_TARGETS)}")
    parts = FAMILY_PARTS.get(model_type or "")
    if parts is None:
        raise LorafitError(f"short target names need separate q/k/v/o projections; model type {model_type!r} is "
                           f"not one of {', '.join(sorted(FAMILY_PARTS))}: list the module names instead")
    return [name for part in SHORT_TARGETS[short] for name in parts[part]]
