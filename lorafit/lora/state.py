"""An adapter's tensors, apart from any module: extract them from a model, check, put them back.

`AdapterState` uses module paths as they are in memory; `lorafit.io` alone turns them into (and
out of) PEFT's file keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from lorafit.errors import AdapterError, BaseMismatch, LorafitError
from lorafit.lora.adalora import SVDLayer
from lorafit.lora.base import base_dims, is_adaptable
from lorafit.lora.experts import ExpertLoraLayer, expert_targets, from_peft_layout, to_peft_layout
from lorafit.lora.ia3 import IA3Layer
from lorafit.lora.inject import adapter_configs, adapter_layers, lora_layers, saved_modules


@dataclass
class AdapterState:
    """layers: path -> {"A": (r, in), "B": (out, r), "magnitude"?: (out,)}; embeddings use
    "embedding_A" (r, num) / "embedding_B" (dim, r). biases: parameter path -> tensor.
    saved: modules_to_save path -> that module's state dict. pissa_converted: ranks were doubled
    to express a PiSSA adapter as a plain LoRA update of the original base weights."""

    layers: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    biases: dict[str, torch.Tensor] = field(default_factory=dict)
    saved: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    pissa_converted: bool = False
    ia3: dict[str, torch.Tensor] = field(default_factory=dict)
    """(IA)³ vectors: path -> (1, in) for a feed-forward layer, (out, 1) otherwise (PEFT's shapes)."""
    experts: dict[str, dict[int, dict[str, torch.Tensor]]] = field(default_factory=dict)
    """MoE expert LoRA: experts-module path -> depth -> {"A": (r·E, in), "B": (out, r·E)}, PEFT's flattened
    layout (lora.experts). depth d is the (n-1-d)-th of the n adapted 3-D parameters of that module in
    its registration order (PEFT nests one wrapper per parameter, the first innermost)."""
    svd: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    """AdaLoRA: path -> {"A": Q (r, in), "E": λ (r, 1), "B": P (out, r)}, the kept triplets only."""


def get_adapter_state(model: nn.Module, adapter: str, bias: str = "none") -> AdapterState:
    """Copy one adapter's tensors out of the model (detached, on CPU, contiguous).

    A PiSSA adapter changed the base weights it sits on; to stay usable on the *original* base it
    is written as the rank-2r update [B, -B0] @ [A; A0], exactly equal to what it learned."""
    state = AdapterState()
    for path, layer in lora_layers(model):
        if adapter not in layer.lora_A:
            continue
        A, B = layer.lora_A[adapter].detach(), layer.lora_B[adapter].detach()
        if adapter in layer.pissa_init:
            A0, B0 = layer.pissa_init[adapter]
            A, B = torch.cat([A, A0]), torch.cat([B, -B0], dim=1)  # (2r, in), (out, 2r)
            state.pissa_converted = True
        if layer.is_embedding:
            entry = {"embedding_A": A, "embedding_B": B}
        else:
            entry = {"A": A, "B": B}
        if adapter in layer.lora_magnitude:
            entry["magnitude"] = layer.lora_magnitude[adapter].detach()
        state.layers[path] = {k: v.cpu().contiguous() for k, v in entry.items()}
        if bias == "lora_only" and getattr(layer.base_layer, "bias", None) is not None:
            state.biases[f"{path}.base_layer.bias"] = layer.base_layer.bias.detach().cpu().contiguous()
    pattern = getattr(adapter_configs(model).get(adapter), "rank_pattern", None) or {}
    for path, layer in adapter_layers(model):
        if isinstance(layer, SVDLayer) and adapter in layer.lora_A:
            A, E, B = (t.detach().cpu() for t in layer.adapter_params(adapter))
            keep = pattern.get(path)
            if keep is not None and len(keep) == A.shape[0]:  # drop the pruned triplets, as PEFT's files do
                mask = torch.tensor(keep, dtype=torch.bool)
                A, E, B = A[mask], E[mask], B[:, mask]
            state.svd[path] = {"A": A.contiguous(), "E": E.contiguous(), "B": B.contiguous()}
        if isinstance(layer, ExpertLoraLayer) and adapter in layer.scaling:
            names = [p for p in layer.params if adapter in layer.lora_A[p]]
            for i, param in enumerate(names):
                A, B = to_peft_layout(layer.lora_A[param][adapter].detach(), layer.lora_B[param][adapter].detach())
                state.experts.setdefault(path, {})[len(names) - 1 - i] = {
                    "A": A.cpu().contiguous(), "B": B.cpu().contiguous()}
        if isinstance(layer, IA3Layer) and adapter in layer.ia3_l:
            vec = layer.ia3_l[adapter].detach().cpu()
            state.ia3[path] = (vec[None, :] if layer.feedforward else vec[:, None]).contiguous()
    if bias == "all":
        for name, p in model.named_parameters():
            if name.endswith("bias") and ".lora_" not in name and ".copies." not in name:
                state.biases[name] = p.detach().cpu().contiguous()
    for path, module in saved_modules(model):
        if adapter in module.copies:
            state.saved[path] = {k: v.detach().cpu().contiguous() for k, v in module.copies[adapter].state_dict().items()}
    return state


def check_fits(model: nn.Module, state: AdapterState, source: str,
               target_parameters: list[str] | None = None) -> dict[str, int]:
    """Validate every tensor against the model before anything changes; return the rank per path
    (per `path.param` for expert weights, resolved through `target_parameters`).

    Raises AdapterError naming the key and both shapes on the first mismatch."""
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    ranks = {}
    for path, tensor in state.ia3.items():
        module = modules.get(path)
        base = getattr(module, "base_layer", module)
        if module is None or not is_adaptable(base):
            raise BaseMismatch(f"{source}: (IA)³ vector for {path!r} but the model has no linear module there; "
                               "is this adapter for another base model?")
        n_in, n_out = base_dims(base)
        if tuple(tensor.shape) not in ((1, n_in), (n_out, 1)):
            raise BaseMismatch(f"{source}: {path}.ia3_l has shape {tuple(tensor.shape)} but the base model needs "
                               f"(1, {n_in}) or ({n_out}, 1); the adapter was trained on a different base model")
    for path, entry in state.layers.items():
        module = modules.get(path)
        base = getattr(module, "base_layer", module)
        if module is None or not is_adaptable(base):
            raise BaseMismatch(f"{source}: adapter weights for {path!r} but the model has no linear/embedding "
                               f"module there; is this adapter for another base model?")
        n_in, n_out = base_dims(base)
        a_key, b_key = ("embedding_A", "embedding_B") if "embedding_A" in entry else ("A", "B")
        if a_key not in entry or b_key not in entry:
            raise AdapterError(f"{source}: {path} has only one of its two LoRA matrices")
        r = entry[a_key].shape[0]
        expected = {a_key: (r, n_in), b_key: (n_out, r), "magnitude": (n_out,)}
        for key, tensor in entry.items():
            if tuple(tensor.shape) != expected[key]:
                raise BaseMismatch(f"{source}: {path}.{key} has shape {tuple(tensor.shape)} but the base model "
                                   f"needs {expected[key]}; the adapter was trained on a different base model")
        ranks[path] = r
    ranks.update(_check_experts(model, state, source, target_parameters))
    for path, entry in state.svd.items():
        module = modules.get(path)
        base = getattr(module, "base_layer", module)
        if module is None or not is_adaptable(base) or set(entry) != {"A", "E", "B"}:
            raise BaseMismatch(f"{source}: AdaLoRA weights for {path!r} do not fit the model (no linear module there, "
                               "or not all of lora_A, lora_E, lora_B); is this adapter for another base model?")
        n_in, n_out = base_dims(base)
        r = entry["A"].shape[0]
        expected = {"A": (r, n_in), "E": (r, 1), "B": (n_out, r)}
        for key, tensor in entry.items():
            if tuple(tensor.shape) != expected[key]:
                raise BaseMismatch(f"{source}: {path}.lora_{key} has shape {tuple(tensor.shape)} but the base model "
                                   f"needs {expected[key]}; the adapter was trained on a different base model")
        ranks[path] = r
    for name, tensor in state.biases.items():
        # before injection a wrapped layer's bias lives at path.bias rather than path.base_layer.bias
        target = params.get(name) if name in params else params.get(name.replace(".base_layer.bias", ".bias"))
        if target is None or target.shape != tensor.shape:
            got = None if target is None else tuple(target.shape)
            raise BaseMismatch(f"{source}: bias {name} of shape {tuple(tensor.shape)} does not fit the model ({got})")
    for path, sd in state.saved.items():
        module = modules.get(path)
        module = getattr(module, "original", module)
        if module is None:
            raise BaseMismatch(f"{source}: modules_to_save entry {path!r} is not a module of this model")
        own = module.state_dict()
        for key, tensor in sd.items():
            if key not in own or own[key].shape != tensor.shape:
                got = None if key not in own else tuple(own[key].shape)
                raise BaseMismatch(f"{source}: {path}.{key} has shape {tuple(tensor.shape)}, the model's is {got}")
    return ranks


def _check_experts(model: nn.Module, state: AdapterState, source: str,
                   target_parameters: list[str] | None) -> dict[str, int]:
    if not state.experts:
        return {}
    try:
        found = expert_targets(model, target_parameters or [])
    except LorafitError as e:
        raise AdapterError(f"{source}: {e}") from None
    modules = dict(model.named_modules())
    ranks = {}
    for path, by_depth in state.experts.items():
        names = found.get(path, [])
        for depth, entry in by_depth.items():
            if depth >= len(names) or "A" not in entry or "B" not in entry:
                raise BaseMismatch(f"{source}: expert LoRA weights for {path!r} (nesting {depth}) match no targeted "
                                   f"3-D parameter there (target_parameters {target_parameters}); another base model?")
            param = names[len(names) - 1 - depth]
            module = modules[path]
            base = module.base_layer if isinstance(module, ExpertLoraLayer) else module
            E, d1, d2 = getattr(base, param).shape
            n_in, n_out = (d1, d2) if getattr(base, "is_transposed", False) else (d2, d1)
            A, B = entry["A"], entry["B"]
            r = A.shape[0] // E
            if r < 1 or A.shape != (r * E, n_in) or B.shape != (n_out, r * E):
                raise BaseMismatch(f"{source}: {path}.{param} LoRA shapes {tuple(A.shape)}, {tuple(B.shape)} do not "
                                   f"fit {E} experts of ({n_out}, {n_in}); the adapter was trained on another model")
            ranks[f"{path}.{param}"] = r
    return ranks


@torch.no_grad()
def set_adapter_state(model: nn.Module, adapter: str, state: AdapterState) -> None:
    """Copy checked tensors into an adapter that `add_adapter` has already created."""
    modules = dict(model.named_modules())
    for path, entry in state.layers.items():
        layer = modules[path]
        a_key, b_key = ("embedding_A", "embedding_B") if layer.is_embedding else ("A", "B")
        layer.lora_A[adapter].copy_(entry[a_key])
        layer.lora_B[adapter].copy_(entry[b_key])
        if "magnitude" in entry:
            layer.lora_magnitude[adapter].copy_(entry["magnitude"])
    for path, entry in state.svd.items():
        for param, tensor in zip(modules[path].adapter_params(adapter), (entry["A"], entry["E"], entry["B"])):
            param.copy_(tensor)
    for path, by_depth in state.experts.items():
        layer = modules[path]
        names = [p for p in layer.params if adapter in layer.lora_A[p]]
        for depth, entry in by_depth.items():
            param = names[len(names) - 1 - depth]
            A, B = from_peft_layout(entry["A"], entry["B"], layer.lora_A[param][adapter].shape[0])
            layer.lora_A[param][adapter].copy_(A)
            layer.lora_B[param][adapter].copy_(B)
    for path, tensor in state.ia3.items():
        layer = modules[path]
        if (tensor.shape[0] == 1) != layer.feedforward or tensor.numel() != layer.ia3_l[adapter].numel():
            raise AdapterError(f"{path}.ia3_l of shape {tuple(tensor.shape)} does not fit a "
                               f"{'feed-forward' if layer.feedforward else 'output-scaling'} (IA)³ layer; "
                               "feedforward_modules in adapter_config.json disagrees with the weights")
        layer.ia3_l[adapter].copy_(tensor.flatten())
    params = dict(model.named_parameters())
    for name, tensor in state.biases.items():
        params[name].copy_(tensor)
    for path, sd in state.saved.items():
        modules[path].copies[adapter].load_state_dict(sd)
