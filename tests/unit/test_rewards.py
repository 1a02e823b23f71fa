"""Rewards: official RULER metrics, simple matches, task dispatch, import-path loading, the safe wrapper, and a
group's training reward (task reward + DAPO overlong shaping)."""

from __future__ import annotations

import logging
import math

import pytest

from longact_lightning.data import rewards
from longact_lightning.data.group_rewards import GroupRewards, overlong_penalty
from longact_lightning.data.records import PromptRecord
from longact_lightning.data.rewards import (
    SafeReward,
    contains_match,
    default_reward,
    exact_match,
    load_reward_fn,
    resolve_reward,
    ruler_score,
    string_match_all,
    string_match_part,
)


def length_reward(completion: str, record: PromptRecord) -> float:
    """A user reward, loaded by import path in a test below."""
    return float(len(completion))


def _rec(*answers: str, task: str = "niah_single_1") -> PromptRecord:
    return PromptRecord(prompt="p", answers=answers, task=task)


def test_string_match_all_and_part_reproduce_hand_computed_scores():
    preds = ["The numbers are 111 and 333.", "  ANSWER: Blue\x00", "alpha, beta"]
    refs = [("111", "222"), ("blue",), ("Alpha", "Beta", "Gamma")]
    per_all = [string_match_all(p, _rec(*r)) for p, r in zip(preds, refs)]
    per_part = [string_match_part(p, _rec(*r)) for p, r in zip(preds, refs)]
    assert per_all == [0.5, 1.0, pytest.approx(2 / 3)]  # case-insensitive, fraction found
    assert per_part == [1.0, 1.0, 1.0]
    # official: sum / len * 100, rounded to 2 decimals: (0.5 + 1 + 2/3) / 3 * 100 = 72.222...
    assert ruler_score(per_all) == 72.22
    per_part[2] = string_match_part("delta", _rec("Alpha", "Beta"))
    assert ruler_score(per_part) == 66.67


def test_prediction_postprocessing_follows_evaluate_py():
    assert rewards.postprocess_prediction("  a\tb\x01c \n") == "a\nb\nc"


def test_exact_and_contains_match():
    assert exact_match("  Paris \n", _rec("Paris")) == 1.0
    assert exact_match("paris", _rec("Paris")) == 0.0
    assert exact_match("It is Paris", _rec("Paris")) == 0.0
    assert contains_match("It is Paris.", _rec("Lyon", "Paris")) == 1.0
    assert contains_match("It is paris.", _rec("Paris")) == 0.0


def test_default_reward_dispatch():
    assert default_reward("niah_single_1") is string_match_all
    assert default_reward("niah_multiquery_noise") is string_match_all
    assert default_reward("cwe") is string_match_all
    assert default_reward("qa_2") is string_match_part
    assert default_reward("longbench_v2") is rewards.longbench_v2_match
    with pytest.raises(ValueError, match=r"'my_task' has no default reward.*exact_match.*package\.module:function"):
        default_reward("my_task")


def test_user_reward_by_import_path():
    fn = resolve_reward("tests.unit.test_rewards:length_reward")
    assert fn("abc", _rec("x")) == 3.0
    assert resolve_reward("contains_match") is contains_match


@pytest.mark.parametrize(
    ("path", "error", "match"),
    [
        ("no_such_module_xyz:f", ImportError, "Cannot import module 'no_such_module_xyz'"),
        ("longact_lightning.data.rewards:no_such_fn", AttributeError, "has no attribute 'no_such_fn'"),
        ("longact_lightning.data.rewards:log", TypeError, "not a function"),
        ("longact_lightning.data.rewards:", ValueError, "package.module:function"),
    ],
)
def test_bad_import_paths_are_clear(path, error, match):
    with pytest.raises(error, match=match):
        load_reward_fn(path)


def test_unknown_reward_name():
    with pytest.raises(ValueError, match="neither a metric"):
        resolve_reward("f1")


def test_safe_reward_scores_failure_zero_counts_and_warns(caplog):
    def flaky(completion: str, record: PromptRecord) -> float:
        if completion == "boom":
            raise RuntimeError("parser exploded")
        if completion == "nan":
            return math.nan
        if completion == "huge":
            return -1e300  # finite in float64, -inf in the float32 batch
        if completion == "text":
            return "1"  # a string is not a score, even one float() would read
        return 1.0

    safe = SafeReward(flaky)
    with caplog.at_level(logging.WARNING, logger="longact_lightning.data.rewards"):
        scores = [safe(c, _rec("x")) for c in ["ok", "boom", "ok", "nan", "huge", "text"]]
    assert scores == [1.0, 0.0, 1.0, 0.0, 0.0, 0.0]
    assert safe.failures == 4
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 4
    assert "beyond float32's range" in warnings[2].getMessage()
    assert "reward returned str '1', not a number" in warnings[3].getMessage()
    assert "RuntimeError: parser exploded" in warnings[0].getMessage()
    assert "Failures so far: 1" in warnings[0].getMessage() and warnings[0].exc_info is not None
    assert "not a finite number" in warnings[1].getMessage() and "Failures so far: 2" in warnings[1].getMessage()


@pytest.mark.parametrize(("length", "expected"), [(10, 0.0), (24, 0.0), (28, -0.25), (32, -0.5), (40, -0.5)])
def test_overlong_penalty_by_hand(length, expected):
    # L_max 32, L_cache 8: free up to 24 tokens, then linear to -scale (0.5) at 32, clamped beyond.
    assert overlong_penalty(length, max_tokens=32, buffer_tokens=8, scale=0.5) == expected
    assert overlong_penalty(length, max_tokens=32, buffer_tokens=0, scale=0.5) == 0.0


def test_group_rewards_add_the_shaping_to_the_task_reward_and_count_failures():
    record = PromptRecord(prompt="p", answers=("42",), task="user_task")
    rewards = GroupRewards("contains_match", max_tokens=32, overlong_buffer_tokens=8, overlong_scale=0.5)
    values, correct = rewards(record, ["it is 42", "it is 42", "no"], [10, 28, 32])
    assert values == [1.0, 0.75, -0.5] and correct == [True, True, False]

    def broken(completion, record):
        raise RuntimeError("bug")

    failing = GroupRewards(broken, max_tokens=32)
    assert failing(record, ["a", "b"], [1, 1]) == ([0.0, 0.0], [False, False])
    assert failing.failures == 2
    with pytest.raises(ValueError, match="has no default reward"):
        GroupRewards(None, max_tokens=32).for_task("user_task")
