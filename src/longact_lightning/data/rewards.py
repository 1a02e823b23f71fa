"""Reward functions ``(completion, record) -> float`` and the wrapper that keeps one bad sample from stopping a run.

The benchmark metrics reproduce the official scorers exactly, so that a reward curve and a benchmark score measure
the same thing: RULER's ``string_match_all`` / ``string_match_part`` (``scripts/eval/synthetic/constants.py``) per
sample in [0, 1] (the official number is their mean × 100, see :func:`ruler_score`), and LongBench v2's letter match
through the official answer extraction. A user's own reward is named by import path in the config.
"""

from __future__ import annotations

import importlib
import logging
import math
import re
from collections.abc import Callable, Iterable

import torch

from longact_lightning.data import infinitebench, longbench, ruler
from longact_lightning.data.records import PromptRecord

log = logging.getLogger(__name__)

_FLOAT32_MAX = torch.finfo(torch.float32).max  # the batch's reward dtype

RewardFn = Callable[[str, PromptRecord], float]


def postprocess_prediction(completion: str) -> str:
    """RULER's ``evaluate.py`` clean-up: strip, turn control characters into newlines, strip again."""
    return re.sub(r"[\x00-\x1f]", "\n", completion.strip()).strip()


def _references(record: PromptRecord) -> tuple[str, ...]:
    if not record.answers:
        raise ValueError(f"Record of task {record.task!r} has no reference answers; its metric needs at least one.")
    return record.answers


def string_match_all(completion: str, record: PromptRecord) -> float:
    """Fraction of the references found in the completion, case-insensitively (RULER niah / vt / cwe / fwe)."""
    prediction = postprocess_prediction(completion).lower()
    references = _references(record)
    return sum(1.0 if reference.lower() in prediction else 0.0 for reference in references) / len(references)


def string_match_part(completion: str, record: PromptRecord) -> float:
    """1 if any reference is found in the completion, case-insensitively, else 0 (RULER qa)."""
    prediction = postprocess_prediction(completion).lower()
    return max(1.0 if reference.lower() in prediction else 0.0 for reference in _references(record))


def ruler_score(per_sample: Iterable[float]) -> float:
    """The official task score from per-sample metric values: mean × 100, rounded to 2 decimals."""
    scores = list(per_sample)
    if not scores:
        raise ValueError("ruler_score() got no samples: pass at least one per-sample score.")
    return round(sum(scores) / len(scores) * 100, 2)


def longbench_v2_match(completion: str, record: PromptRecord) -> float:
    """1 if the officially extracted letter equals the gold letter; no extractable letter scores 0."""
    return 1.0 if longbench.extract_answer(completion.strip()) == _references(record)[0] else 0.0


def exact_match(completion: str, record: PromptRecord) -> float:
    """1 if the stripped completion equals a stripped reference exactly (case-sensitive), else 0."""
    prediction = completion.strip()
    return 1.0 if any(prediction == reference.strip() for reference in _references(record)) else 0.0


def contains_match(completion: str, record: PromptRecord) -> float:
    """1 if a reference occurs verbatim (case-sensitive) in the completion, else 0."""
    return 1.0 if any(reference in completion for reference in _references(record)) else 0.0


def infinitebench_first_int(completion: str, record: PromptRecord) -> float:
    """InfiniteBench passkey / number_string: 1 if the completion's first run of digits is the key, else 0."""
    return float(infinitebench.first_int_match(completion) == _references(record)[0])


def infinitebench_kv_match(completion: str, record: PromptRecord) -> float:
    """InfiniteBench kv_retrieval: 1 if the value is one of the completion's words (punctuation as spaces)."""
    return float(_references(record)[0] in infinitebench.retrieval_words(completion))


METRICS: dict[str, RewardFn] = {
    "string_match_all": string_match_all,
    "string_match_part": string_match_part,
    "longbench_v2_match": longbench_v2_match,
    "infinitebench_first_int": infinitebench_first_int,
    "infinitebench_kv_match": infinitebench_kv_match,
    "exact_match": exact_match,
    "contains_match": contains_match,
}

DEFAULT_METRIC: dict[str, str] = {
    **dict.fromkeys(ruler.TASKS, "string_match_all"),
    "qa_1": "string_match_part",
    "qa_2": "string_match_part",
    longbench.TASK: "longbench_v2_match",
    "passkey": "infinitebench_first_int",
    "number_string": "infinitebench_first_int",
    "kv_retrieval": "infinitebench_kv_match",
}


def default_reward(task: str) -> RewardFn:
    """The official metric of a benchmark task.

    Raises:
        ValueError: for a task without one (user data): the message says how to choose a reward.
    """
    if task not in DEFAULT_METRIC:
        raise ValueError(
            f"Task {task!r} has no default reward (known: {sorted(DEFAULT_METRIC)}). Set the reward explicitly to one "
            f"of {sorted(METRICS)} or to an import path 'package.module:function'."
        )
    return METRICS[DEFAULT_METRIC[task]]


def resolve_reward(spec: str) -> RewardFn:
    """A reward from config: a metric name from :data:`METRICS` or an import path ``package.module:function``."""
    if spec in METRICS:
        return METRICS[spec]
    if ":" in spec:
        return load_reward_fn(spec)
    raise ValueError(
        f"Reward {spec!r} is neither a metric ({sorted(METRICS)}) nor an import path of the form "
        "'package.module:function'."
    )


def load_reward_fn(path: str) -> RewardFn:
    """Import a user's reward function from ``package.module:function``.

    Raises:
        ValueError: if ``path`` is not of that form.
        ImportError: if the module cannot be imported (the message names it).
        AttributeError: if the module has no such function.
        TypeError: if the attribute is not callable.
    """
    module_name, _, attribute = path.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"Reward import path {path!r} must look like 'package.module:function'.")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ImportError(
            f"Cannot import module {module_name!r} of reward {path!r} ({error}); check the spelling and that the "
            "module is installed or on PYTHONPATH."
        ) from error
    if not hasattr(module, attribute):
        raise AttributeError(f"Reward {path!r}: module {module_name!r} has no attribute {attribute!r}; check the name.")
    function = getattr(module, attribute)
    if not callable(function):
        raise TypeError(f"Reward {path!r} is a {type(function).__name__}, not a function (completion, record).")
    return function


class SafeReward:
    """Wraps a reward so that a sample it fails on scores 0 instead of ending the run.

    One malformed completion (or a bug in a user's reward hit by a rare input) should cost one sample, not a
    multi-hour job; but silently zeroing would hide a broken reward, so each failure is logged with its exception and
    counted in :attr:`failures`, which a DataModule logs. A non-finite reward counts as a failure too, since it
    would turn every advantage in its group into NaN, and so does one beyond float32's range (the batch's dtype),
    where it would become infinite.

    Args:
        fn: the reward function.
    """

    def __init__(self, fn: RewardFn) -> None:
        self.fn = fn
        self.failures = 0

    def __call__(self, completion: str, record: PromptRecord) -> float:
        try:
            value = self.fn(completion, record)
            if isinstance(value, (str, bytes)):  # float("1") would read a string that was meant as something else
                raise TypeError(f"reward returned {type(value).__name__} {value!r}, not a number")
            reward = float(value)
            if not math.isfinite(reward):
                raise ValueError(f"reward is {reward}, not a finite number")
            if abs(reward) > _FLOAT32_MAX:
                raise ValueError(f"reward {reward} is beyond float32's range (+-{_FLOAT32_MAX:.3g}), the batch's dtype")
        except Exception as error:  # any failure of reward code costs one sample, by design
            self.failures += 1
            log.warning(
                "Reward %s failed on a %r sample (%s: %s); scored 0. Failures so far: %d.",
                getattr(self.fn, "__qualname__", repr(self.fn)),
                record.task,
                type(error).__name__,
                error,
                self.failures,
                exc_info=error if self.failures == 1 else None,  # the traceback once; the count after that
            )
            return 0.0
        return reward
