"""The paths `lorafit verify` computes in this process: the adapter on its base, the exact merge, and the
merge requantized to NF4 (with what of each layer's update survives), and PEFT loading the folder.

Each returns, per probe, the (positions, vocab) fp32 next-token log-probs (lorafit.fingerprint).
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import torch

from lorafit.fingerprint import Probe, probe_logprobs
from lorafit.io import load_adapter
from lorafit.merge import MergeError, merge_quantized, merge_to_dense
from lorafit.model import load_model, resolve_model


def load_adapted(model: str | None, adapter: str | Path, quantize: str | None, device, dtype):
    """(model with the adapter active, tokenizer), the base loaded as training loaded it."""
    base, tokenizer = load_model(model, quantize=quantize, dtype=dtype, device=device)
    return load_adapter(base, adapter), tokenizer


def adapter_and_merge(model: str | None, adapter: str | Path, quantize: str | None, probes: list[Probe],
                      pad_id: int, device, dtype) -> tuple[list[torch.Tensor], list[torch.Tensor], object]:
    """(the adapter on its base, the exact merge in fp32 / the base's dtype) log-probs, and the merged
    model (for a GGUF export); one load: the merge comes after the adapter's own forward."""
    adapted, _ = load_adapted(model, adapter, quantize, device, dtype)
    on_base = probe_logprobs(adapted, probes, pad_id)
    merged = merge_to_dense(adapted, dtype=torch.float32 if dtype == torch.float32 else dtype).eval()
    return on_base, probe_logprobs(merged, probes, pad_id), merged


def requantized(model: str | None, adapter: str | Path, probes: list[Probe], pad_id: int, device,
                dtype) -> tuple[list[torch.Tensor], list[MergeError]]:
    """The merge into the NF4 base, requantized (what `lorafit merge --quantize nf4` writes), and per
    layer its drift and the share of the update that survives (lorafit.merge)."""
    adapted, _ = load_adapted(model, adapter, "nf4", device, dtype)
    with torch.no_grad():
        report = merge_quantized(adapted)
    return probe_logprobs(adapted, probes, pad_id), report


def peft_logprobs(model: str | None, adapter: str | Path, quantize: str | None, probes: list[Probe],
                  pad_id: int) -> list[torch.Tensor] | str:
    """PEFT's `PeftModel.from_pretrained` on the folder, over transformers' own model of the base (for an
    NF4 base: bitsandbytes' 4-bit layers holding the very codes lorafit trained on). A string says why
    the row is skipped."""
    try:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
    except ImportError:
        return "peft is not installed (pip install peft)"
    if quantize not in (None, "nf4"):
        return f"PEFT has no {quantize} base"
    with tempfile.TemporaryDirectory(prefix="lorafit-verify-") as tmp:
        folder = resolve_model(model)
        if quantize == "nf4":
            try:
                import bitsandbytes  # noqa: F401
            except ImportError:
                return "an NF4 base in PEFT needs bitsandbytes (pip install bitsandbytes)"
            from lorafit.quant.load import load_quantized, save_bnb_checkpoint

            folder = save_bnb_checkpoint(load_quantized(folder, "nf4"), Path(tmp) / "bnb")
        base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        with warnings.catch_warnings():  # PEFT names the config keys it does not know (lorafit_format_version)
            warnings.filterwarnings("ignore", message="Unexpected keyword arguments")
            peft = PeftModel.from_pretrained(base, str(adapter))
        # train mode without dropout: bitsandbytes' CPU inference path repacks 4-bit weights lossily
        peft.train()
        for module in peft.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        return probe_logprobs(peft, probes, pad_id)
