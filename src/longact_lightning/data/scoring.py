"""Greedy completions of prompt records, each scored with its task's official metric.

Shared by ``longact eval`` (``eval/evaluate.py``), the validation and test loops of ``fit`` / ``validate`` / ``test``
(``RolloutDataModule.val_dataloader``) and the ablation driver, so a held-out score means the same everywhere.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from longact_lightning.data import infinitebench, longbench, ruler
from longact_lightning.data.records import PromptRecord, chat_prompt_ids
from longact_lightning.data.rewards import DEFAULT_METRIC, RewardFn, default_reward, resolve_reward
from longact_lightning.rollout.base import SamplingConfig

LONGBENCH_MAX_TOKENS = 128  # pred.py's max_tokens for 0-shot


@dataclass(frozen=True)
class RecordResult:
    """One scored greedy completion.

    Attributes:
        task: the record's task.
        metric: name of the official metric that scored it.
        score: the per-sample metric value in [0, 1].
        prediction: the decoded completion (special tokens removed).
        answers: the references.
        prompt_tokens: prompt length after the chat template.
        completion_tokens: generated tokens.
        truncated: generation hit ``max_tokens``.
        metadata: the record's metadata (RULER ``target_length``; LongBench ``difficulty`` / ``length``), plus
            ``pred`` (the extracted letter) for LongBench v2.
    """

    task: str
    metric: str
    score: float
    prediction: str
    answers: tuple[str, ...]
    prompt_tokens: int
    completion_tokens: int
    truncated: bool
    metadata: dict[str, Any] = field(default_factory=dict)


def generation_budget(record: PromptRecord, max_tokens: int | None = None) -> int:
    """Tokens to generate for ``record``: ``max_tokens`` if given, else the benchmark's own budget.

    RULER uses each task's ``tokens_to_generate``, LongBench v2 0-shot 128, InfiniteBench its per-task budget; other
    tasks have none.
    """
    if max_tokens is not None:
        return max_tokens
    if record.task in ruler.TASKS:
        return ruler.TASKS[record.task].tokens_to_generate
    if record.task == longbench.TASK:
        return LONGBENCH_MAX_TOKENS
    if record.task in infinitebench.MAX_NEW_TOKENS:
        return infinitebench.MAX_NEW_TOKENS[record.task]
    raise ValueError(f"Task {record.task!r} has no official generation budget; pass max_tokens=<tokens to generate>.")


def evaluate_records(
    engine: Any,
    tokenizer: Any,
    records: Iterable[PromptRecord],
    max_tokens: int | None = None,
    metric: str | RewardFn | None = None,
) -> list[RecordResult]:
    """Greedy completions of ``records`` through ``engine``, each scored with its task's official metric.

    Records are generated in one ``engine.generate`` call per generation budget (RULER tasks differ), in input order
    within it; results come back in input order.

    Args:
        engine: a :class:`~longact_lightning.rollout.base.RolloutEngine` (vLLM or HF) serving the weights to score.
        tokenizer: the model's tokenizer (chat template, decoding).
        records: the records; their tasks must have an official metric (``data.rewards.DEFAULT_METRIC``).
        max_tokens: tokens to generate for every record; ``None`` = each benchmark's own (:func:`generation_budget`).
        metric: score every record with this instead of its task's official metric: a name of
            ``data.rewards.METRICS``, an import path ``package.module:function`` or a callable
            ``(completion_text, record) -> float``.
    """
    records = list(records)
    if not records:
        raise ValueError("evaluate_records() got no records: pass at least one PromptRecord.")
    tasks = {r.task for r in records}
    if metric is None:
        metrics = {task: default_reward(task) for task in tasks}  # fails early on a task without one
        names = {task: DEFAULT_METRIC[task] for task in tasks}
    else:
        scorer = resolve_reward(metric) if isinstance(metric, str) else metric
        metrics = dict.fromkeys(tasks, scorer)
        names = dict.fromkeys(tasks, metric if isinstance(metric, str) else getattr(metric, "__name__", "custom"))
    by_budget: dict[int, list[int]] = {}
    for index, record in enumerate(records):
        by_budget.setdefault(generation_budget(record, max_tokens), []).append(index)
    results: list[RecordResult | None] = [None] * len(records)
    for budget, indices in by_budget.items():
        prompts = [chat_prompt_ids(tokenizer, records[i]) for i in indices]
        groups = engine.generate(prompts, SamplingConfig(n=1, temperature=0.0, max_tokens=budget))
        for i, prompt, group in zip(indices, prompts, groups, strict=True):
            record, rollout = records[i], group[0]
            text = tokenizer.decode(rollout.completion_ids, skip_special_tokens=True)
            metadata = dict(record.metadata)
            if record.task == longbench.TASK:
                metadata["pred"] = longbench.extract_answer(text.strip())
            results[i] = RecordResult(
                task=record.task,
                metric=names[record.task],
                score=float(metrics[record.task](text, record)),
                prediction=text,
                answers=tuple(record.answers),
                prompt_tokens=len(prompt),
                completion_tokens=len(rollout.completion_ids),
                truncated=rollout.truncated,
                metadata=metadata,
            )
    return results  # type: ignore[return-value]
