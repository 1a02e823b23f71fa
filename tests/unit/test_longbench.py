"""LongBench v2: the official 0-shot prompt, middle truncation, answer extraction and result.py breakdowns."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from longact_lightning.data.longbench import (
    TASK,
    LongBenchV2Source,
    breakdown,
    build_prompt,
    extract_answer,
    truncate_middle,
)
from longact_lightning.data.records import PromptRecord
from longact_lightning.data.rewards import longbench_v2_match
from longact_lightning.data.sources import EmptySourceError

FIXTURE = Path(__file__).parents[1] / "fixtures" / "longbench_v2_tiny.json"

# prompts/0shot.txt filled with fixture item lb-0001 by hand: every value stripped, no trailing newline.
EXPECTED_LB_0001 = (
    "Please read the following text and answer the question below.\n"
    "\n"
    "<text>\n"
    "Borvia is a small republic. Its capital, Tesk, lies on the river Ost.\n"
    "</text>\n"
    "\n"
    "What is the correct answer to this question: Which city is the capital of Borvia?\n"
    "Choices:\n"
    "(A) Arland\n"
    "(B) Tesk\n"
    "(C) Cendra\n"
    "(D) Dunmore\n"
    "\n"
    'Format your response as follows: "The correct answer is (insert answer here)".'
)


@pytest.fixture(scope="module")
def tokenizer():
    from longact_lightning.models import load_tokenizer

    return load_tokenizer("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def items():
    return json.loads(FIXTURE.read_text())


class CharTokenizer:
    """One token per character: makes head/tail token counts visible as literal strings."""

    def encode(self, text):
        return [ord(c) for c in text]

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(i) for i in ids)


def test_prompt_equals_official_template(items):
    assert build_prompt(items[0]) == EXPECTED_LB_0001


def test_prompt_fill_is_sequential_replace(items):
    # pred.py replaces $DOC$ first, so a document quoting "$Q$" gets the question spliced in; a single-pass
    # format would leave "$Q$" in the document.
    prompt = build_prompt(items[1])
    assert "Clause 1 quotes the marker Which clause quotes the question marker? literally." in prompt
    assert "$" not in prompt


def test_source_reads_hub_schema_file(tmp_path, items):
    records = list(LongBenchV2Source(str(FIXTURE), load_kwargs={"cache_dir": str(tmp_path)}))
    assert [r.metadata["_id"] for r in records] == ["lb-0001", "lb-0002", "lb-0003", "lb-0004"]
    first = records[0]
    assert first.prompt == EXPECTED_LB_0001
    assert first.answers == ("B",) and first.task == TASK and first.answer_prefix == ""
    assert first.metadata == {
        "_id": "lb-0001",
        "domain": "Single-Document QA",
        "sub_domain": "Academic",
        "difficulty": "easy",
        "length": "short",
    }


def test_rows_with_null_or_missing_fields_are_skipped_and_named(tmp_path, items):
    rows = json.loads(FIXTURE.read_text())
    rows[1]["question"] = None  # a null field: skipped with its row index
    del rows[2]["context"]  # another schema's row
    path = tmp_path / "data.json"
    path.write_text(json.dumps(rows))
    with pytest.warns(UserWarning, match="row 1 .* skipped, fields not text: {'question': 'NoneType'}"):
        records = list(LongBenchV2Source(str(path), load_kwargs={"cache_dir": str(tmp_path / "cache")}))
    assert [r.metadata["_id"] for r in records] == ["lb-0001", "lb-0004"]


def test_a_file_of_another_schema_fails_naming_the_fix(tmp_path):
    path = tmp_path / "other.json"
    path.write_text(json.dumps([{"text": "a", "label": 1}, {"text": "b", "label": 0}]))
    with pytest.warns(UserWarning, match="skipped"), pytest.raises(EmptySourceError, match="data.json / parquet"):
        next(iter(LongBenchV2Source(str(path), load_kwargs={"cache_dir": str(tmp_path / "cache")})))


def test_middle_truncation_keeps_floor_head_and_ceil_tail():
    tok = CharTokenizer()
    # max 5 of "abcdefghij": head 5//2 = 2 ("ab"), tail 5 - 2 = 3 ("hij"), as pred.py's ids[:5//2] + ids[-5//2:].
    assert truncate_middle("abcdefghij", tok, 5) == "abhij"
    assert truncate_middle("abcdefghij", tok, 4) == "abij"
    assert truncate_middle("abcdefghij", tok, 10) == "abcdefghij"  # fits: untouched


def test_source_truncates_with_real_tokenizer(tmp_path, items, tokenizer):
    full = build_prompt(items[2])
    ids = tokenizer.encode(full)
    assert len(ids) > 151 > len(tokenizer.encode(EXPECTED_LB_0001))
    records = list(
        LongBenchV2Source(str(FIXTURE), max_length=151, tokenizer=tokenizer, load_kwargs={"cache_dir": str(tmp_path)})
    )
    truncated = records[2].prompt
    assert truncated == tokenizer.decode(ids[:75] + ids[-76:], skip_special_tokens=True)
    assert truncated != tokenizer.decode(ids[:76] + ids[-75:], skip_special_tokens=True)
    assert truncated.startswith("Please read the following text")
    assert truncated.endswith('"The correct answer is (insert answer here)".')
    assert records[0].prompt == EXPECTED_LB_0001  # short items are untouched


def test_truncation_without_tokenizer_is_a_clear_error():
    with pytest.raises(ValueError, match="needs a tokenizer"):
        iter(LongBenchV2Source(str(FIXTURE), max_length=100))


@pytest.mark.parametrize(
    ("response", "letter"),
    [
        ("The correct answer is (B)", "B"),
        ("**The correct answer is (C)**", "C"),  # markdown bold removed first
        ("The correct answer is *(A)*", "A"),  # '*' removal lets the parenthesised regex match
        ("The correct answer is D.", "D"),  # second regex, no parentheses
        ("The correct answer is C, no wait: The correct answer is (A)", "A"),  # parenthesised regex is tried first
        ("the correct answer is (B)", None),  # case-sensitive
        ("The correct answer is (E)", None),  # only A-D
        ("I would pick (B).", None),
        ("", None),
    ],
)
def test_extract_answer(response, letter):
    assert extract_answer(response) == letter


def test_letter_reward_no_match_is_wrong():
    record = PromptRecord(prompt="p", answers=("B",), task=TASK)
    assert longbench_v2_match("  The correct answer is (B)\n", record) == 1.0
    assert longbench_v2_match("The correct answer is (A)", record) == 0.0
    assert longbench_v2_match("B", record) == 0.0  # no extractable letter = wrong, even if it "says" B


def test_breakdown_arithmetic():
    results = [
        {"difficulty": "easy", "length": "short", "judge": True},
        {"difficulty": "easy", "length": "short", "judge": False},
        {"difficulty": "easy", "length": "medium", "judge": True},
        {"difficulty": "hard", "length": "long", "judge": True},
        {"difficulty": "hard", "length": "medium", "judge": False},
        {"difficulty": "hard", "length": "long", "judge": False},
        {"difficulty": "unknown", "length": "huge", "judge": True},  # not "easy" -> hard; not short/medium -> long
    ]
    # overall 4/7 = 57.14; easy 2/3; hard 2/4; short 1/2; medium 1/2; long 2/3.
    assert breakdown(results) == {
        "overall": 57.1,
        "easy": 66.7,
        "hard": 50.0,
        "short": 50.0,
        "medium": 50.0,
        "long": 66.7,
    }


def test_breakdown_compensated_and_empty_bucket():
    results = [
        {"difficulty": "easy", "length": "short", "judge": True, "pred": "A"},
        {"difficulty": "easy", "length": "short", "judge": False, "pred": None},
    ]
    # compensated: the unextractable item scores 0.25 -> 1.25 / 2 = 62.5; without it 50.0.
    assert breakdown(results, compensated=True)["overall"] == 62.5
    scores = breakdown(results)
    assert scores["overall"] == 50.0 and scores["hard"] is None and scores["long"] is None
    with pytest.raises(ValueError, match="no results"):
        breakdown([])
