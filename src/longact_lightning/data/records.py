"""The prompt record every source yields and every reward function scores."""

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
