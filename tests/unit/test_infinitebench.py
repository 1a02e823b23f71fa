"""InfiniteBench's synthetic tasks: records against the repository's templates by hand, its scorers on hand cases."""

from __future__ import annotations

import json
import random

import pytest

from longact_lightning.data.infinitebench import (
    INSTRUCTIONS,
    NOISE,
    InfiniteBenchSource,
    first_int_match,
    number_string_key,
)
from longact_lightning.data.records import PromptRecord
from longact_lightning.data.rewards import default_reward

TOKENIZER = "smollm2-135m-instruct"


@pytest.mark.parametrize(("task", "needle", "question", "digits"), [
    ("passkey", "The pass key is {key}. Remember it. {key} is the pass key.\n", "What is the pass key?", 5),
    ("number_string", "The sequence of digits is {key}. Remember it. {key} is the sequence of digits.\n",
     "What is the sequence of digits?", 10),
])  # fmt: skip
def test_needle_records_follow_the_template(task, needle, question, digits):
    source = InfiniteBenchSource(task, target_length=600, tokenizer=TOKENIZER, num_samples=3)
    for record in source:
        key = record.answers[0]
        assert key.isdigit() and len(key) == digits
        head = INSTRUCTIONS[task] + "\n\n"
        assert record.prompt.startswith(head) and record.prompt.endswith("\n\n" + question)
        context = record.prompt[len(head) : -len("\n\n" + question)]
        lines = context.splitlines(keepends=True)
        assert lines.count(needle.replace("{key}", key)) == 1
        assert len(lines) - 1 == record.metadata["units"] and all(
            line in (NOISE, needle.replace("{key}", key)) for line in lines
        )
        assert 0.8 * 600 <= source.count_tokens(record.prompt) <= 600


def test_kv_records_ask_for_a_value_of_their_json():
    source = InfiniteBenchSource("kv_retrieval", target_length=800, tokenizer=TOKENIZER, num_samples=2)
    for record in source:
        head = INSTRUCTIONS["kv_retrieval"] + "\n\nJSON data:\n"
        assert record.prompt.startswith(head)
        data, question = record.prompt[len(head) :].split("\n\n")
        pairs = json.loads(data)
        key = question.removeprefix('Key: "').removesuffix('"\nThe value associated with the specified key is: ')
        assert pairs[key] == record.answers[0] and len(pairs) == record.metadata["units"]
        assert source.count_tokens(record.prompt) <= 800


def test_number_string_keys_repeat_digits_in_place():
    class Scripted(random.Random):
        def __init__(self, values):
            super().__init__(0)
            self.values = list(values)

        def randint(self, a, b):
            return self.values.pop(0)

    # digits 1 2 3 4 5, then the digit at position 0 is repeated five times
    assert number_string_key(Scripted([1, 2, 3, 4, 5, 0, 0, 0, 0, 0])) == "1111112345"
    assert number_string_key(Scripted([1, 2, 3, 4, 5, 4, 5, 6, 7, 8])) == "1234555555"


def test_same_seed_same_records():
    make = lambda seed: [r.prompt for r in InfiniteBenchSource("passkey", 300, TOKENIZER, num_samples=2, seed=seed)]  # noqa: E731
    assert make(1) == make(1) and make(1) != make(2)


@pytest.mark.parametrize(("prediction", "first"), [
    ("The pass key is 12345. Remember it.", "12345"), ("no digits here", ""), ("a1b22", "1"), ("007", "007"),
])  # fmt: skip
def test_first_int_match(prediction, first):
    assert first_int_match(prediction) == first


@pytest.mark.parametrize(("task", "answer", "prediction", "score"), [
    ("passkey", "12345", "The pass key is 12345.", 1.0),
    ("passkey", "12345", "The pass key is 123456.", 0.0),  # the whole first number must match
    ("passkey", "12345", "I saw 99 keys; it is 12345", 0.0),  # only the first number counts
    ("number_string", "1111112345", "1111112345", 1.0),
    ("kv_retrieval", "ab-12", 'The value is "ab-12".', 1.0),  # quotes and the full stop are separators
    ("kv_retrieval", "ab-12", "The value is ab-123", 0.0),  # a word, not a substring
])  # fmt: skip
def test_official_scorers_on_hand_cases(task, answer, prediction, score):
    assert default_reward(task)(prediction, PromptRecord(prompt="p", answers=(answer,), task=task)) == score


def test_bad_arguments_name_the_value():
    with pytest.raises(ValueError, match="Unknown InfiniteBench task 'code_run'"):
        InfiniteBenchSource("code_run", 1000)
    with pytest.raises(ValueError, match="needs a tokenizer"):
        next(iter(InfiniteBenchSource("passkey", 1000)))


@pytest.mark.parametrize(("task", "tokens"), [("passkey", 6), ("number_string", 12), ("kv_retrieval", 50)])
def test_held_out_generation_uses_the_official_budget(task, tokens):
    from longact_lightning.data.scoring import generation_budget

    assert generation_budget(PromptRecord("p", ("1",), task)) == tokens
