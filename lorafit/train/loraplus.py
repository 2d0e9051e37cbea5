"""LoRA+ (Hayou et al. 2024): B learns `ratio` times faster than A.

With A and B at one learning rate, the update of a wide layer is dominated by the side with the
larger width; the paper shows (for width n -> inf) that efficient feature learning needs
lr_B / lr_A = Θ(n) and suggests a fixed ratio of about 2^4 in practice. Here that is two optimizer
parameter groups:

    group "lora_B":  every LoRA B matrix of a linear layer      lr = ratio · lr_A,  lr_ratio = ratio
    group "rest":    A matrices, DoRA magnitudes, embedding      lr = lr_A,          lr_ratio = 1
                     adapters, trained biases, modules_to_save

`lr_ratio` stays in each group, so a learning-rate schedule sets `group["lr"] = lr · group["lr_ratio"]`
and the ratio holds at every step (and through a checkpoint: the groups are saved with the optimizer).
Embedding adapters keep the base rate: in the paper's analysis their B is not the wide side.
"""

from __future__ import annotations

from torch import nn

from lorafit.lora.inject import lora_layers


def loraplus_param_groups(model: nn.Module, ratio: float) -> list[dict]:
    """The model's trainable parameters as [rest, lora_B] optimizer groups with `lr_ratio` 1 and
    `ratio` (empty groups left out). The caller's optimizer sets the base `lr`."""
    b_ids = {id(layer.lora_B[n]) for _, layer in lora_layers(model) if not layer.is_embedding
             for n in layer.adapter_names()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    b = [p for p in trainable if id(p) in b_ids]
    rest = [p for p in trainable if id(p) not in b_ids]
    groups = [{"params": rest, "lr_ratio": 1.0, "name": "rest"},
              {"params": b, "lr_ratio": float(ratio), "name": "lora_B"}]
    return [g for g in groups if g["params"]]
