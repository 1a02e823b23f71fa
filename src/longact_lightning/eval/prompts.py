"""The exact token ids a policy sees for a record: chat template around the prompt, then the answer prefix.

Profiling and evaluation must feed the model what training feeds it (``RolloutDataModule.prompt_ids`` builds the
same ids), so RULER's answer prefix sits right after the assistant header and the model continues from it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from longact_lightning.data.records import PromptRecord


def chat_prompt_ids(tokenizer: Any, record: PromptRecord) -> list[int]:
    """``chat_template(user: record.prompt) + assistant header + record.answer_prefix`` as token ids.

    A tokenizer without a chat template gets the bare prompt (RULER's ``base`` template).
    """
    text = record.prompt
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": record.prompt}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text + record.answer_prefix, add_special_tokens=False)["input_ids"]


def truncate_middle_ids(ids: Sequence[int], max_tokens: int) -> list[int]:
    """Keep ⌊max/2⌋ head and ⌈max/2⌉ tail tokens (LongBench v2's rule: the question is at the end)."""
    if max_tokens < 2:
        raise ValueError(f"max_tokens={max_tokens} must be >= 2 to keep both a head and a tail.")
    if len(ids) <= max_tokens:
        return list(ids)
    return list(ids[: max_tokens // 2]) + list(ids[len(ids) - (max_tokens - max_tokens // 2) :])
