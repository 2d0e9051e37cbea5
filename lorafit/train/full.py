"""Full fine-tuning (`TrainConfig.method: full`): every weight of the model trains, the baseline an
adapter is compared against.

The loop is the adapter loop (`lorafit.train.trainer`): the optimizer sees whatever requires a gradient,
so making every parameter trainable is all the preparation it needs. What differs is what a run writes:
a full model folder (`config.json` + `model.safetensors` [+ tokenizer], `save_pretrained`'s format, which
`lorafit.model.load_model` and transformers read back) instead of an adapter. AdamW then keeps two fp32
moments per weight, so the run needs about 4x the model's fp32 size in memory, against a few MB for LoRA.

A quantized base cannot be trained in full (its packed codes are not parameters), and a model that
already carries adapters would mix the two methods: both are refused before anything changes.
"""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file
from torch import nn

from lorafit.errors import LorafitError
from lorafit.lora.base import is_quantized
from lorafit.lora.inject import lora_layers
from lorafit.paths import write_folder

MODEL_DIR = "model"  # where a full run writes its weights, next to metrics.jsonl (an adapter run: adapter/)


def make_fully_trainable(model: nn.Module) -> nn.Module:
    """Every parameter of `model` requires a gradient. Checked first: a quantized layer or a LoRA
    layer in the model raises a LorafitError and leaves the model unchanged."""
    quantized = next((name for name, m in model.named_modules() if is_quantized(m)), None)
    if quantized is not None:
        raise LorafitError(f"method: full trains every weight, but the base is quantized ({quantized}); "
                           "set quantize: null (QLoRA is method: lora with quantize: nf4)")
    adapted = next((name for name, _ in lora_layers(model)), None)
    if adapted is not None:
        raise LorafitError(f"method: full needs a model without LoRA adapters, but {adapted} has one; "
                           "load the base model alone")
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def save_model_folder(model: nn.Module, directory: str | Path, tokenizer=None) -> Path:
    """Write the whole model (and its tokenizer, when given) with `save_pretrained`, into a temporary
    folder renamed into place, so an interrupted save never leaves half a model where one was."""
    def write(folder: Path) -> None:
        model.save_pretrained(folder)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
    return write_folder(directory, write)


def load_model_weights(model: nn.Module, directory: str | Path) -> None:
    """Put the weights of a folder `save_model_folder` wrote back into `model` (same architecture).
    Keys the folder lacks may only be tied ones (an output head sharing the embedding)."""
    directory = Path(directory)
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise LorafitError(f"{directory}: no *.safetensors weights; the checkpoint is incomplete")
    state = {}
    for f in files:
        state.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {name for name, p in model.named_parameters(remove_duplicate=False)} - {
        name for name, _ in model.named_parameters()}
    if unexpected or set(missing) - tied:
        raise LorafitError(f"{directory}: weights do not fit the model (missing {sorted(set(missing) - tied)[:3]}, "
                           f"unexpected {sorted(unexpected)[:3]})")
