"""Packed rows without leaks: each sample of a row attends only to itself, whatever the attention kernel.

A packed row (`lorafit.train.data.pack`) holds several samples back to back, its `position_ids`
restarting at 0 for each (and for the padding after the last one). How a model is told where the
samples end depends on the attention implementation its config declares (`config._attn_implementation`):

    eager, sdpa, flex (every implementation with a mask builder in transformers' masking_utils)
        no attention_mask at all: transformers then reads the restarts of position_ids and builds a
        block-diagonal causal mask itself (sliding windows and chunks included, counted within each sample)
    flash_attention_2/3/4, kernels-community flash kernels
        no attention_mask, plus the varlen arguments (cu_seq_lens_q/k, max_length_q/k) computed from
        position_ids over the flattened batch: one variable-length sequence per sample and per pad run
    anything else (an implementation registered by hand), and the families whose transformers code builds
        its masks without the position ids (`POSITIONS_UNSEEN`: gpt-oss)
        4-D additive block-diagonal causal masks built here: one per layer type the config declares
        (full, sliding window, chunked: a mapping, which those models take as it is), else one tensor
        (with the config's sliding window where every layer has it), passed through untouched

An unpacked batch keeps its 2-D padding mask. Generation and serving never pack and keep theirs.

A 2-D attention_mask with restarted positions is *not* enough: transformers looks for packed
sequences only when no mask is given, so every sample would attend to the samples before it.

Layers that carry a state along the sequence (Mamba / linear attention / short convolutions) cannot be
told where a sample starts through attention at all. `check_packing` runs a probe through the real
training step before a packed run starts: the same row with its first sample's tokens changed must
give the second sample exactly the same loss, and that loss must equal the sample's own loss unpacked.
A model failing it (or one whose forward rejects the probe) is refused in one line, before training.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from lorafit.errors import LorafitError
from lorafit.sequence_state import recurrent_layers
from lorafit.train.data import IGNORE, Sample, collate

# model_type -> why the model's mask builders never see position_ids (so "positions" cannot isolate).
POSITIONS_UNSEEN = {"gpt_oss": "transformers' gpt-oss calls its mask builders without the position ids"}
# Relative tolerance of "the packed sample's loss equals its unpacked loss": the two run the same
# arithmetic in another order (masked softmax over more keys), so fp32 agrees to ~1e-7 and 16-bit
# compute to ~1e-3 (a leak moves a loss by percents).
PROBE_RTOL = {torch.float32: 1e-4, torch.float64: 1e-8}
PROBE_RTOL_16BIT = 2e-2
# "Changing the sample before it does not change a packed sample's loss": an isolated sample runs the
# very same arithmetic either way (masked scores are -inf, their weights exactly 0), so the two losses
# are bitwise equal; a short convolution reaching two tokens back already moves it by ~1e-6.
LEAK_RTOL = 1e-7


def attention_kind(model: nn.Module) -> str:
    """How packed samples are isolated for this model: "positions", "varlen" or "mask" (module docstring)."""
    config = getattr(model, "config", None)
    impl = getattr(config, "_attn_implementation", None) or "eager"
    if "flash" in impl:
        return "varlen"
    if getattr(config, "model_type", None) in POSITIONS_UNSEEN:
        return "mask"
    try:
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    except ImportError:  # transformers without masking_utils: build the mask ourselves
        return "mask"
    return "positions" if impl in ALL_MASK_ATTENTION_FUNCTIONS else "mask"


def is_packed(batch: dict[str, torch.Tensor]) -> bool:
    """A batch of packed rows (`collate` leaves the 2-D padding mask out of those)."""
    return "attention_mask" not in batch


def model_inputs(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict:
    """The keyword arguments a forward of `batch` takes: input_ids, position_ids, and what isolates
    packed samples for this model (module docstring); `use_cache=False` always (a cache would also
    switch transformers' packed-sequence detection off)."""
    inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
    if not is_packed(batch):
        inputs["attention_mask"] = batch["attention_mask"]
        return inputs
    kind = attention_kind(model)
    if kind == "varlen":
        inputs.update(varlen_kwargs(batch["position_ids"]))
    elif kind == "mask":
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        inputs["attention_mask"] = block_masks(model.config, batch["position_ids"], dtype)
    return inputs


def segment_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) -> (B, T): the index of the sample each token belongs to within its row (a new one
    wherever the position does not follow the previous one)."""
    step = torch.diff(position_ids, dim=-1, prepend=position_ids[:, :1] - 1)  # (B, T)
    return (step != 1).cumsum(-1)


def block_causal_mask(position_ids: torch.Tensor, dtype: torch.dtype, window: int | None = None,
                      chunk: int | None = None) -> torch.Tensor:
    """(B, T) positions -> (B, 1, T, T) additive mask: 0 where query t may read key s (same sample,
    s <= t; with `window`, t - s < window; with `chunk`, both in the same chunk of the sample's
    positions), the dtype's minimum elsewhere."""
    seg = segment_ids(position_ids)
    T = position_ids.shape[-1]
    causal = torch.ones(T, T, dtype=torch.bool, device=position_ids.device).tril()  # (T, T)
    allowed = (seg[:, :, None] == seg[:, None, :]) & causal  # (B, T, T)
    if window is not None:
        allowed &= (position_ids[:, :, None] - position_ids[:, None, :]) < window
    if chunk is not None:
        allowed &= (position_ids[:, :, None] // chunk) == (position_ids[:, None, :] // chunk)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=position_ids.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


def block_masks(config, position_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | dict[str, torch.Tensor]:
    """The packed rows' masks (`block_causal_mask`): a mapping layer type -> mask when the config
    declares layer types (full_attention, sliding_attention, chunked_attention: transformers' names,
    which its models index their masks by), else one mask, windowed when every layer slides."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if not layer_types:
        slides = window is not None and getattr(config, "use_sliding_window", True) is not False
        return block_causal_mask(position_ids, dtype, window=window if slides else None)
    chunk = getattr(config, "attention_chunk_size", None)
    kinds = {"full_attention": {}, "sliding_attention": {"window": window}, "chunked_attention": {"chunk": chunk}}
    return {kind: block_causal_mask(position_ids, dtype, **kinds.get(kind, {})) for kind in set(layer_types)}


def varlen_kwargs(position_ids: torch.Tensor) -> dict:
    """Flash attention's variable-length arguments for the flattened (B*T) batch: cumulative sample
    starts (int32, one per sample and per pad run, then B*T) and the longest sample."""
    flat = position_ids.reshape(-1)
    seg = segment_ids(position_ids).reshape(-1)
    starts = seg.diff(prepend=seg[:1] - 1) != 0  # (B*T,) where a new sample or pad run begins
    starts[torch.arange(0, flat.numel(), position_ids.shape[-1], device=flat.device)] = True  # every row starts one
    cu = torch.cat([starts.nonzero().view(-1), torch.tensor([flat.numel()], device=flat.device)]).to(torch.int32)
    longest = int(cu.diff().max())
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


# -- the probe ------------------------------------------------------------------------------------
def _probe_samples(vocab: int) -> tuple[Sample, Sample, Sample, Sample]:
    """Two first samples of the same length and different tokens, a second sample trained on all but
    its first token, and a shorter row to pad against (a fixed generator: every rank builds the same)."""
    g = torch.Generator().manual_seed(1234)
    ids = [torch.randint(1, vocab, (n,), generator=g).tolist() for n in (6, 6, 9, 4)]
    a, a2, b, c = ids
    first = [IGNORE] * 6
    packed = [Sample(a + b, first + [IGNORE] + b[1:], "probe", list(range(6)) + list(range(9))),
              Sample(a2 + b, first + [IGNORE] + b[1:], "probe", list(range(6)) + list(range(9)))]
    short = Sample(c, [IGNORE] * 4, "probe", list(range(4)))
    alone = Sample(b, [IGNORE] + b[1:], "probe")
    return packed[0], packed[1], short, alone


def _describe(model: nn.Module, attention: bool = True) -> str:
    config = getattr(model, "config", None)
    kind = getattr(config, "model_type", None)
    impl = getattr(config, "_attn_implementation", None) or "eager"
    if not kind:
        return type(model).__name__
    return type(model).__name__ + (f" ({kind!r}, attention {impl})" if attention else f" ({kind!r})")


@torch.no_grad()
def check_packing(model: nn.Module, step: Callable[[dict[str, torch.Tensor]], torch.Tensor],
                  device: torch.device) -> None:
    """Refuse, in one line, a model on which packed samples would see each other (module docstring).

    `step(batch)` is the training step's loss sum of a batch on `device` (the Trainer passes its DDP /
    FSDP wrapper's, so every process runs the same probe). The model is probed in eval mode (no dropout)
    and left in the mode it had."""
    why = _recurrent_reason(model)
    if why is not None:
        raise LorafitError(f"packing: {_describe(model, attention=False)} {why}, which lorafit cannot restart at each packed "
                           "sample: set data.packing: false")
    vocab = model.get_input_embeddings().weight.shape[0]
    first, first_changed, short, alone = _probe_samples(vocab)
    was_training = model.training
    model.eval()
    try:
        def loss(samples: list[Sample]) -> float:
            batch = {k: v.to(device) for k, v in collate(samples, 0).items()}
            return float(step(batch))

        packed, changed, unpacked = loss([first, short]), loss([first_changed, short]), loss([alone])
    except (TypeError, ValueError, RuntimeError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise LorafitError(f"packing: {_describe(model)} fails a forward of packed rows ({reason}): set "
                           "data.packing: false") from e
    finally:
        model.train(was_training)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    rtol = PROBE_RTOL.get(dtype, PROBE_RTOL_16BIT)
    if abs(packed - changed) > LEAK_RTOL * abs(packed):
        raise LorafitError(f"packing: on {_describe(model)} a packed sample's loss changes with the sample before "
                           f"it in the row ({packed:.6g} vs {changed:.6g}): its layers carry information across "
                           "sample boundaries; set data.packing: false")
    if abs(packed - unpacked) > rtol * abs(unpacked):
        raise LorafitError(f"packing: on {_describe(model)} a packed sample's loss ({packed:.6g}) differs from the "
                           f"same sample unpacked ({unpacked:.6g}): the model does not restart positions at "
                           "position_ids; set data.packing: false")


def _recurrent_reason(model: nn.Module) -> str | None:
    """Why a model keeps a state along the sequence that attention masks cannot cut, or None
    (`lorafit.sequence_state`: the layer kinds its config declares)."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    layers = recurrent_layers(config)
    if not layers:
        return None
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    types = getattr(text, "layer_types", None) or []
    kinds = sorted({str(types[i]) for i in layers if i < len(types)}) or ["recurrent"]
    return f"has {', '.join(kinds)} layers that carry a state along the sequence"
