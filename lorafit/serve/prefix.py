"""Which newly admitted requests can prefill a common prompt prefix once.

A burst of chat requests repeats its system prompt. On one adapter those tokens give the same KV
in every row, so the engine computes them once per adapter and copies the KV to each row (on
different adapters they differ: the adapted k/v projections see the same tokens differently).

Sliding-window attention (Mistral, Gemma 2 and 3, Phi-3) limits the window by KV column, not by
position: transformers masks key j from query i when i - j >= window, counting cache columns. A shared
prefix leaves padding between a row's prefix and the rest of its prompt, so columns and positions
part there; such a group is only formed when no row can ever reach back a window's length across
it (prompt + completion + that padding within the window). Chunked attention (Llama 4) is the same
case: transformers starts each row's chunks after its left padding, counting columns, so padding inside
a row would move its chunk boundaries; the chunk size counts as the window. Elsewhere every row's tokens
are contiguous columns, and the column mask is the position mask.
"""

from __future__ import annotations

from lorafit.serve.requests import Request

MIN_SHARED_PREFIX = 8  # tokens: a shorter common prefix does not pay for its extra forward


def sliding_window(config) -> int | None:
    """The sliding-window width (or attention chunk size) of a model's attention, or None when no layer
    uses one."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    chunk = getattr(config, "attention_chunk_size", None)
    if chunk and "chunked_attention" in (getattr(config, "layer_types", None) or ["chunked_attention"]):
        return int(chunk)
    window = getattr(config, "sliding_window", None)
    if not window or getattr(config, "use_sliding_window", None) is False:
        return None
    types = getattr(config, "layer_types", None)
    return None if types is not None and "sliding_attention" not in types else int(window)


def shared_prefixes(rows: list[Request], window: int | None = None
                    ) -> tuple[list[tuple[list[Request], int]], list[Request]]:
    """([(rows, prefix length)], other rows): rows on the same adapter whose prompts start alike.

    Rows on one adapter with the very same prompt (n samples of one prompt, GRPO's group of completions)
    form a group each, sharing all of it but the last token; the other rows of an adapter form one group
    over their common start. Each row keeps at least one token of its own to prefill (its logits give the
    first token). With a sliding `window`, a group whose padding could fall inside some row's window is
    not formed."""
    by_adapter: dict[str | None, list[Request]] = {}
    for r in rows:
        by_adapter.setdefault(r.internal, []).append(r)
    groups, plain = [], []

    def add(members: list[Request], common: int) -> None:
        rest = max(len(r.prompt_ids) for r in members) - common  # the most padding a row gets after the prefix
        fits = window is None or all(len(r.prompt_ids) + r.params.max_tokens + rest <= window for r in members)
        if len(members) > 1 and common >= MIN_SHARED_PREFIX and fits:
            groups.append((members, common))
        else:
            plain.extend(members)

    for members in by_adapter.values():
        same: dict[tuple[int, ...], list[Request]] = {}
        for r in members:
            same.setdefault(tuple(r.prompt_ids), []).append(r)
        others = []
        for prompt, copies in same.items():
            if len(copies) > 1 and len(prompt) - 1 >= MIN_SHARED_PREFIX:
                add(copies, len(prompt) - 1)
            else:
                others += copies
        if others:
            prompts = [r.prompt_ids for r in others]
            shortest = min(map(len, prompts))
            common = next((i for i, column in enumerate(zip(*prompts)) if len(set(column)) > 1), shortest)
            add(others, min(common, shortest - 1))
    return groups, plain
