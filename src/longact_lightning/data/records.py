"""The prompt record every source yields and every reward function scores, and the token ids a policy sees for it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class PromptRecord:
    """One task instance, before the chat template.

    Attributes:
        prompt: the user message (the full task text, context included).
        answers: reference answers; what they mean is up to the task's metric (RULER: all must appear; LongBench v2:
            one letter).
        task: the task name (``niah_single_1``, ``longbench_v2``, ``jsonl``, ...), used to pick the metric and to
            break results down.
        answer_prefix: text placed right after the chat template's assistant header (RULER's answer prefix); the
            model continues from it.
        metadata: anything else worth keeping per record (LongBench v2 ``difficulty`` / ``length`` / ``domain``,
            RULER target length, source line number, ...).
    """

    prompt: str
    answers: tuple[str, ...]
    task: str
    answer_prefix: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)


def chat_prompt_ids(tokenizer: Any, record: PromptRecord) -> list[int]:
    """``chat_template(user: record.prompt) + assistant header + record.answer_prefix`` as token ids.

    A tokenizer without a chat template gets the bare prompt (RULER's ``base`` template).
    """
    text = record.prompt
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": record.prompt}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text + record.answer_prefix, add_special_tokens=False)["input_ids"]
