"""The typed rollout and the engine protocol every generation backend implements.

A rollout engine turns token-id prompts into ``G`` sampled completions each, with the log-probability the engine
assigned to every sampled token (needed for truncated importance sampling between engine and trainer), and accepts
new policy weights after each optimizer step so that the next rollouts are on-policy.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

import torch


@dataclass(frozen=True)
class SamplingConfig:
    """Sampling parameters shared by all engines.

    Args:
        n: completions per prompt (the GRPO group size G).
        temperature: softmax temperature; 0 means greedy.
        top_p: nucleus sampling mass.
        max_tokens: maximum completion length in tokens.
        seed: base seed; engines derive per-request seeds from it so a run is reproducible.
    """

    n: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 256
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"n={self.n} must be >= 1 (completions per prompt).")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0 (0 = greedy).")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1].")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens={self.max_tokens} must be >= 1.")


@dataclass(frozen=True)
class Rollout:
    """One sampled completion of one prompt.

    Attributes:
        prompt_ids: the prompt's token ids, ``[P]``.
        completion_ids: the sampled token ids, ``[C]`` (EOS included when the engine stopped on it).
        logprobs: the engine's log-probability of each sampled token, ``[C]``; ``None`` if the engine cannot report
            them.
        finish_reason: ``"stop"`` (EOS or stop string) or ``"length"`` (hit ``max_tokens``: truncated).
    """

    prompt_ids: tuple[int, ...]
    completion_ids: tuple[int, ...]
    logprobs: tuple[float, ...] | None
    finish_reason: Literal["stop", "length"]

    @property
    def truncated(self) -> bool:
        return self.finish_reason == "length"


StopFn = Callable[[], bool]


class GenerationInterrupted(Exception):
    """``generate`` stopped before its completions were finished, because ``should_stop`` asked it to."""


@runtime_checkable
class RolloutEngine(Protocol):
    """What the DataModule needs from a generation backend."""

    def generate(
        self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig, should_stop: StopFn | None = None
    ) -> list[list[Rollout]]:
        """Sample ``sampling.n`` completions for each prompt; returns one list of ``n`` rollouts per prompt.

        ``should_stop`` is polled between decode steps; once it returns True the engine drops the call's requests and
        raises :class:`GenerationInterrupted` (a stop request must not wait for a long generation to finish).
        """
        ...

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Replace the served weights (HF parameter names) and drop any cached KV computed with the old ones."""
        ...
