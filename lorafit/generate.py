"""Greedy or sampled generation for a batch of prompts, rendered as training rendered them.

A prompt is token ids from `render_prompt` (lorafit.prompt: the chat template, lorafit's instruction
format for template-less models, or raw text), so a fine-tuned model sees at inference exactly the
prompt part of its training samples. Generation stops at EOS, the generation config's EOS ids and the
chat template's end-of-turn token. A completion that comes back empty is never silent: `generate`
warns, and `why_empty` says what happened (the model ended at once, or wrote only special tokens).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from lorafit.device import model_device
from lorafit.prompt import PromptFormat, default_format, prompt_ids, stop_ids, text_ids


def render_prompt(tokenizer, user_text: str, fmt: PromptFormat | None = None, input: str = "") -> list[int]:
    """The ids a model is prompted with for one instruction (and an Alpaca `input`): the start of the
    training sample of that record. `fmt`: the adapter's recorded format (`lorafit.io.read_prompt_format`);
    None: the tokenizer's default (its chat template, else lorafit's instruction format)."""
    return prompt_ids(tokenizer, fmt or default_format(tokenizer), user_text, input)


@torch.no_grad()
def generate_ids(model: nn.Module, tokenizer, prompts: list[list[int]] | list[str], max_new_tokens: int = 64,
                 temperature: float = 0.0, batch_size: int = 16) -> list[list[int]]:
    """New token ids for each prompt, up to (not including) the first stop token. A prompt is ids
    (`render_prompt`) or raw text (encoded with BOS as the tokenizer does, nothing else added)."""
    was_training = model.training
    model.eval()
    device = model_device(model)  # the prompts' tensors follow the model
    stops = stop_ids(tokenizer, getattr(model, "generation_config", None))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(stops)
    ids = [text_ids(tokenizer, p) if isinstance(p, str) else list(p) for p in prompts]
    outputs: list[list[int]] = []
    try:
        for i in range(0, len(ids), batch_size):
            chunk = ids[i:i + batch_size]
            width = max(len(p) for p in chunk)
            input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], device=device)  # (B, T) left-padded
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
            sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
            out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                 pad_token_id=pad, eos_token_id=sorted(stops), **sampling)
            for row in out[:, width:].tolist():  # (B, new tokens)
                end = next((j for j, t in enumerate(row) if t in stops), len(row))
                outputs.append(row[:end])
    finally:
        model.train(was_training)
    return outputs


def generate(model: nn.Module, tokenizer, prompts: list[list[int]] | list[str], max_new_tokens: int = 64,
             temperature: float = 0.0, batch_size: int = 16) -> list[str]:
    """Completions of prompts (`generate_ids`), decoded without special tokens and stripped. An empty
    completion comes with a warning saying why."""
    new = generate_ids(model, tokenizer, prompts, max_new_tokens, temperature, batch_size)
    texts = [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in new]
    for i, (text, ids) in enumerate(zip(texts, new)):
        if not text:
            warnings.warn(f"prompt {i + 1}: {why_empty(tokenizer, ids)}", stacklevel=2)
    return texts


def why_empty(tokenizer, new_ids: list[int]) -> str:
    """One line on why a completion decoded to nothing (`new_ids`: its tokens before the stop)."""
    if not new_ids:
        return "the model ended at once (its first new token was a stop token): the completion is empty"
    return (f"the model wrote only special or blank tokens ({len(new_ids)} of them, e.g. "
            f"{tokenizer.convert_ids_to_tokens(new_ids[:3])}): the completion is empty")
