"""Greedy or sampled generation for a batch of prompts, with the tokenizer's chat format."""

from __future__ import annotations

import torch
from torch import nn

from lorafit.device import model_device


def render_prompt(tokenizer, user_text: str, chat: bool = True) -> str:
    """A user message as the model expects it: through the chat template when there is one."""
    if chat and tokenizer.chat_template:
        return tokenizer.apply_chat_template([{"role": "user", "content": user_text}], tokenize=False,
                                             add_generation_prompt=True)
    return user_text


@torch.no_grad()
def generate(model: nn.Module, tokenizer, prompts: list[str], max_new_tokens: int = 64,
             temperature: float = 0.0, batch_size: int = 16) -> list[str]:
    """Completions of already-rendered prompts (left-padded batches; greedy when temperature is 0)."""
    was_training = model.training
    model.eval()
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    outputs: list[str] = []
    device = model_device(model)  # the prompts' tensors follow the model
    try:
        for i in range(0, len(prompts), batch_size):
            enc = tokenizer(prompts[i:i + batch_size], padding=True, add_special_tokens=False)
            enc = {k: torch.tensor(enc[k], device=device) for k in ("input_ids", "attention_mask")}  # (B, T)
            sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
            out = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id, **sampling)
            new = out[:, enc["input_ids"].shape[1]:]  # (B, new tokens)
            outputs += [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return outputs
