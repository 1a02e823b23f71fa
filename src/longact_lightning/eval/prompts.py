"""Token-level prompt truncation for evaluation (prompt ids themselves come from ``data.records.chat_prompt_ids``,
the function training uses too, so profiling and evaluation feed the model exactly what training feeds it)."""

from __future__ import annotations

from collections.abc import Sequence


def truncate_middle_ids(ids: Sequence[int], max_tokens: int) -> list[int]:
    """Keep ⌊max/2⌋ head and ⌈max/2⌉ tail tokens (LongBench v2's rule: the question is at the end)."""
    if max_tokens < 2:
        raise ValueError(f"max_tokens={max_tokens} must be >= 2 to keep both a head and a tail.")
    if len(ids) <= max_tokens:
        return list(ids)
    return list(ids[: max_tokens // 2]) + list(ids[len(ids) - (max_tokens - max_tokens // 2) :])
