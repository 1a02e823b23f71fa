"""The training reward of a group of completions: each task's reward, made safe, plus DAPO's overlong shaping.

Kept apart from the DataModule so that what a completion earns is decided by the task side (``data/``) in one place:
the DataModule only hands over the record, the decoded completions and their lengths.
"""

from __future__ import annotations

from longact_lightning.data.records import PromptRecord
from longact_lightning.data.rewards import RewardFn, SafeReward, default_reward, resolve_reward


def overlong_penalty(length: int, max_tokens: int, buffer_tokens: int, scale: float) -> float:
    """DAPO Eq. 13 (soft overlong punishment): 0 up to ``max_tokens - buffer_tokens`` completion tokens, then
    linearly down to ``-scale`` at ``max_tokens``. ``buffer_tokens = 0`` disables it."""
    if buffer_tokens == 0:
        return 0.0
    free = max_tokens - buffer_tokens
    if length <= free:
        return 0.0
    return scale * max(-1.0, (free - length) / buffer_tokens)


class GroupRewards:
    """Scores a prompt's completions: ``reward(completion, record)`` (the configured one, else the task's official
    metric) wrapped in :class:`SafeReward`, plus :func:`overlong_penalty`.

    Args:
        reward: a metric name of ``rewards.METRICS``, an import path ``package.module:function``, a callable, or
            ``None`` for each task's official metric. A bad name or path fails here, at construction.
        max_tokens: the completion length limit ``L_max``.
        overlong_buffer_tokens: DAPO's ``L_cache`` (0 = no shaping).
        overlong_scale: the penalty at ``L_max``.
    """

    def __init__(
        self,
        reward: str | RewardFn | None,
        max_tokens: int,
        overlong_buffer_tokens: int = 0,
        overlong_scale: float = 1.0,
    ) -> None:
        self._explicit = resolve(reward)
        self.max_tokens = max_tokens
        self.overlong_buffer_tokens = overlong_buffer_tokens
        self.overlong_scale = overlong_scale
        self._by_task: dict[str | None, SafeReward] = {}  # task (None = the explicit reward) -> its wrapped reward

    def for_task(self, task: str) -> SafeReward:
        """The reward of ``task``'s records; raises for a task without an official metric when none is configured."""
        key = None if self._explicit is not None else task
        if key not in self._by_task:
            self._by_task[key] = SafeReward(self._explicit or default_reward(task))
        return self._by_task[key]

    def __call__(
        self, record: PromptRecord, completions: list[str], lengths: list[int]
    ) -> tuple[list[float], list[bool]]:
        """``(rewards, correct)`` of one group: what the advantage sees (task reward + overlong penalty), and
        whether each completion's task reward alone reached 1."""
        reward_fn = self.for_task(record.task)
        rewards, correct = [], []
        for text, length in zip(completions, lengths, strict=True):
            task_reward = reward_fn(text, record)
            shaped = overlong_penalty(length, self.max_tokens, self.overlong_buffer_tokens, self.overlong_scale)
            rewards.append(task_reward + shaped)
            correct.append(task_reward >= 1.0)
        return rewards, correct

    @property
    def failures(self) -> int:
        """Samples the rewards failed on (scored 0), over all tasks."""
        return sum(reward.failures for reward in self._by_task.values())


def resolve(reward: str | RewardFn | None) -> RewardFn | None:
    """A configured reward as a function (``None`` stays ``None``), so a bad name or import path fails at once."""
    if reward is None or callable(reward):
        return reward
    return resolve_reward(reward)
