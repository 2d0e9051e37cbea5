"""Which newly admitted requests can prefill a common prompt prefix once.

A burst of chat requests repeats its system prompt. On one adapter those tokens give the same KV
in every row, so the engine computes them once per adapter and copies the KV to each row (on
different adapters they differ: the adapted k/v projections see the same tokens differently).
"""

from __future__ import annotations

from lorafit.serve.requests import Request

MIN_SHARED_PREFIX = 8  # tokens: a shorter common prefix does not pay for its extra forward


def shared_prefixes(rows: list[Request]) -> tuple[list[tuple[list[Request], int]], list[Request]]:
    """([(rows, prefix length)], other rows): rows on the same adapter whose prompts start alike.

    Each row keeps at least one token of its own to prefill (its logits give the first token)."""
    by_adapter: dict[str | None, list[Request]] = {}
    for r in rows:
        by_adapter.setdefault(r.internal, []).append(r)
    groups, plain = [], []
    for members in by_adapter.values():
        prompts = [r.prompt_ids for r in members]
        shortest = min(map(len, prompts))
        common = next((i for i, column in enumerate(zip(*prompts)) if len(set(column)) > 1), shortest)
        common = min(common, shortest - 1)
        if len(members) > 1 and common >= MIN_SHARED_PREFIX:
            groups.append((members, common))
        else:
            plain += members
    return groups, plain
