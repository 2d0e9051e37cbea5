"""Convert NF4 weights to and from the bitsandbytes 4-bit state-dict layout that transformers saves.

For a module prefix `p` (e.g. "model.layers.0.mlp.up_proj"), a double-quantized NF4 weight is stored as
  p.weight                                  uint8 (ceil(numel / 2), 1) packed codes
  p.weight.absmax                           uint8 (n_blocks,) codes of the centred block absmax
  p.weight.quant_map                        fp32 (16,) NF4 levels
  p.weight.nested_absmax                    fp32 (ceil(n_blocks / 256),)
  p.weight.nested_quant_map                 fp32 (256,) dynamic map
  p.weight.quant_state.bitsandbytes__nf4    uint8 UTF-8 JSON: quant_type, blocksize, dtype, shape,
                                            nested_blocksize, nested_dtype, nested_offset
Without double quantization `absmax` is fp32 and the nested entries are absent (QLoRA, Dettmers et al. 2023).
"""

from __future__ import annotations

import json

import torch

from lorafit.errors import LorafitError
from lorafit.quant.nf4 import NF4_LEVELS, STATS_BLOCKSIZE, VALID_BLOCKSIZES, NF4Tensor, dynamic_map

_QS_KEY = "quant_state.bitsandbytes__nf4"


def _weight_key(prefix: str) -> str:
    prefix = prefix.rstrip(".")
    return f"{prefix}.weight" if prefix else "weight"


def nf4_to_bnb_state(prefix: str, t: NF4Tensor) -> dict[str, torch.Tensor]:
    """The bitsandbytes serialized tensors for module `prefix` holding NF4 weight `t`."""
    key = _weight_key(prefix)
    meta: dict[str, object] = {
        "quant_type": "nf4",
        "blocksize": t.blocksize,
        "dtype": str(t.dtype).removeprefix("torch."),
        "shape": list(t.shape),
    }
    state = {
        key: t.packed.reshape(-1, 1),
        f"{key}.absmax": t.absmax,
        f"{key}.quant_map": torch.tensor(NF4_LEVELS, dtype=torch.float32, device=t.packed.device),
    }
    if t.double_quant:
        assert t.state2 is not None and t.offset is not None and t.code2 is not None
        state[f"{key}.nested_absmax"] = t.state2
        state[f"{key}.nested_quant_map"] = t.code2.clone()
        meta.update(nested_blocksize=STATS_BLOCKSIZE, nested_dtype="float32", nested_offset=t.offset.item())
    state[f"{key}.{_QS_KEY}"] = torch.tensor(list(json.dumps(meta).encode("utf-8")), dtype=torch.uint8)
    return state


def nf4_from_bnb_state(prefix: str, state_dict: dict[str, torch.Tensor]) -> NF4Tensor:
    """Read the NF4 weight of module `prefix` from a bitsandbytes-format state dict, checking every piece."""
    key = _weight_key(prefix)

    def need(name: str) -> torch.Tensor:
        if name not in state_dict:
            raise LorafitError(f"missing {name!r} in the 4-bit checkpoint; was it saved with bitsandbytes nf4?")
        return state_dict[name]

    packed = need(key)
    raw = need(f"{key}.{_QS_KEY}")
    try:
        meta = json.loads(bytes(raw.to(torch.uint8).cpu().tolist()).decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise LorafitError(f"{key}.{_QS_KEY} is not valid JSON ({e}); the checkpoint is corrupt") from e
    if meta.get("quant_type") != "nf4":
        raise LorafitError(f"{key} has quant_type {meta.get('quant_type')!r}; only nf4 is supported")
    blocksize = int(meta.get("blocksize", 0))
    if blocksize not in VALID_BLOCKSIZES:
        raise LorafitError(f"{key} has blocksize {blocksize}; expected one of {VALID_BLOCKSIZES}")
    shape = torch.Size(meta["shape"])
    dtype = getattr(torch, str(meta.get("dtype", "float32")))
    numel = shape.numel()
    n_blocks = -(-numel // blocksize)
    if packed.dtype != torch.uint8 or packed.numel() != -(-numel // 2):
        raise LorafitError(
            f"{key} has {packed.numel()} {packed.dtype} values, expected {-(-numel // 2)} uint8 for shape {tuple(shape)}"
        )
    absmax = need(f"{key}.absmax")
    if absmax.numel() != n_blocks:
        raise LorafitError(
            f"{key}.absmax has {absmax.numel()} values, expected {n_blocks} (shape {tuple(shape)}, blocksize {blocksize})"
        )
    quant_map = need(f"{key}.quant_map")
    if not torch.equal(quant_map.float().cpu(), torch.tensor(NF4_LEVELS)):
        raise LorafitError(f"{key}.quant_map is not the NF4 code table; only nf4 weights are supported")
    t = NF4Tensor(packed=packed.reshape(-1), absmax=absmax, shape=shape, dtype=dtype, blocksize=blocksize)
    if f"{key}.nested_absmax" in state_dict or "nested_offset" in meta:
        if absmax.dtype != torch.uint8:
            raise LorafitError(f"{key}.absmax is {absmax.dtype}; double-quantized statistics must be uint8")
        state2 = need(f"{key}.nested_absmax")
        if int(meta.get("nested_blocksize", -1)) != STATS_BLOCKSIZE or state2.numel() != -(-n_blocks // 256):
            raise LorafitError(
                f"{key}.nested_absmax has {state2.numel()} values with nested_blocksize "
                f"{meta.get('nested_blocksize')}; expected {-(-n_blocks // 256)} with {STATS_BLOCKSIZE}"
            )
        code2 = need(f"{key}.nested_quant_map").float()
        if not torch.equal(code2.cpu(), dynamic_map("cpu")):
            raise LorafitError(f"{key}.nested_quant_map is not bitsandbytes' dynamic map; cannot decode it")
        t.state2 = state2.float()
        t.code2 = code2
        t.offset = torch.tensor(float(meta["nested_offset"]), dtype=torch.float32, device=absmax.device)
    elif absmax.dtype != torch.float32:
        raise LorafitError(f"{key}.absmax is {absmax.dtype} without nested statistics; expected float32")
    return t
