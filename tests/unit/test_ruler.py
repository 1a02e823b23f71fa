"""RULER generator: official template strings, needles present once, target length band, seeding, search procedure.

Length band (embedded SmolLM2 tokenizer, chat template counted, target 1024 incl. tokens_to_generate): every prompt
is within [0.85, 1.0] x 1024 (fwe: [0.75, 1.0], its official linear search steps by 1/32 of the budget) and the mean
is >= 0.95 x 1024 (fwe: >= 0.85). The lower bound is one RULER retry step below the searched size.
"""

from __future__ import annotations

import math
import re
from collections import Counter

import pytest

from longact_lightning.data.records import PromptRecord
from longact_lightning.data.rewards import string_match_all
from longact_lightning.data.ruler import (
    NIAH_ANSWER_PREFIX,
    NIAH_TEMPLATE,
    NOISE,
    TASKS,
    RulerSource,
    binary_search_size,
    linear_search_size,
    singular,
    zeta,
)

TARGET = 1024


@pytest.fixture(scope="module")
def tokenizer():
    from longact_lightning.models import load_tokenizer

    return load_tokenizer("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def records(tokenizer):
    """Eight records per task at the target length (seed 7), shared by the tests below."""
    return {task: list(RulerSource(task, TARGET, tokenizer, num_samples=8, seed=7)) for task in TASKS}


NEEDLE = re.compile(r"One of the special magic (numbers|uuids) for (\S+) is: (\S+)\.")


def test_singular_rewrite_matches_reference_string():
    assert singular(NIAH_TEMPLATE + NIAH_ANSWER_PREFIX) == (
        "A special magic {type_needle_v} is hidden within the following text. Make sure to memorize it. I will quiz "
        "you about the {type_needle_v} afterwards.\n{context}\nWhat is the special magic {type_needle_v} for {query} "
        "mentioned in the provided text? The special magic {type_needle_v} for {query} mentioned in the provided "
        "text is"
    )


@pytest.mark.parametrize(
    ("task", "type_v"),
    [
        ("niah_single_1", "number"),
        ("niah_multikey_2", "number"),
        ("niah_multikey_3", "uuid"),
        ("niah_single_3_noise", "uuid"),
    ],
)
def test_single_needle_prompts_are_the_official_singular_text(records, task, type_v):
    for record in records[task]:
        (needle,) = [m for m in NEEDLE.finditer(record.prompt) if m.group(3) == record.answers[0]]
        key = needle.group(2)
        assert record.prompt.startswith(
            f"A special magic {type_v} is hidden within the following text. Make sure to memorize it. "
            f"I will quiz you about the {type_v} afterwards.\n"
        )
        assert record.prompt.endswith(f"\nWhat is the special magic {type_v} for {key} mentioned in the provided text?")
        assert record.answer_prefix == f" The special magic {type_v} for {key} mentioned in the provided text is"
        assert needle.group(0) == f"One of the special magic {type_v}s for {key} is: {record.answers[0]}."


def test_noise_haystack_is_the_noise_sentence(records):
    body = records["niah_single_1"][0].prompt.split("\n")[1:-1]
    assert set(body) - {NOISE} == {next(NEEDLE.finditer(records["niah_single_1"][0].prompt)).group(0)}


def test_multi_query_prompt_is_plural_with_and_joined_keys(records):
    for record in records["niah_multiquery_noise"]:
        needles = {m.group(3): m.group(2) for m in NEEDLE.finditer(record.prompt)}
        keys = [needles[value] for value in record.answers]
        query = f"{keys[0]}, {keys[1]}, {keys[2]}, and {keys[3]}"
        assert record.prompt.startswith(
            "Some special magic numbers are hidden within the following text. Make sure to memorize it. "
            "I will quiz you about the numbers afterwards.\n"
        )
        question = f"\nWhat are all the special magic numbers for {query} mentioned in the provided text?"
        assert record.prompt.endswith(question)
        assert record.answer_prefix == f" The special magic numbers for {query} mentioned in the provided text are"


@pytest.mark.parametrize("task", [t for t, spec in TASKS.items() if spec.kind == "niah"])
def test_each_needle_present_exactly_once(records, task):
    for record in records[task]:
        needles = list(NEEDLE.finditer(record.prompt))
        answer_needles = [m for m in needles if m.group(3) in record.answers]
        assert sorted(m.group(3) for m in answer_needles) == sorted(record.answers)
        for match in answer_needles:
            assert record.prompt.count(match.group(0)) == 1
            # the key is asked about and no distractor shares it
            assert record.answer_prefix.count(match.group(2)) == 1
            assert sum(m.group(2) == match.group(2) for m in needles) == TASKS[task].niah.num_v
        assert string_match_all(" ".join(record.answers), record) == 1.0


def test_variable_tracking_prompt_icl_and_chain(records):
    for record in records["vt"]:
        value = re.search(r"assigned the value (\d{5}), they are: $", record.answer_prefix).group(1)
        assert record.answer_prefix == (
            " Answer: According to the chain(s) of variable assignment in the text above, 5 variables are assigned "
            f"the value {value}, they are: "
        )
        head = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
        assert record.prompt.startswith(head) and record.prompt.count(head) == 2  # one-shot example, then the task
        icl, task_text = record.prompt[: record.prompt.rindex(head)], record.prompt[record.prompt.rindex(head) :]
        icl_value = re.search(r"Answer: .* assigned the value (\d{5}), they are:  ([A-Z]{3}( [A-Z]{3}){4})\n$", icl)
        assert icl_value is not None and icl_value.group(1) != value and "12345" not in icl
        question = f"\nQuestion: Find all variables that are assigned the value {value} in the text above."
        assert task_text.endswith(question)
        names = record.answers
        assert len(names) == 5 and all(re.fullmatch(r"[A-Z]{5}", n) for n in names)
        assert task_text.count(f"VAR {names[0]} = {value}\n") == 1
        for previous, name in zip(names, names[1:]):
            assert task_text.count(f"VAR {name} = VAR {previous} \n") == 1
        assert task_text.index(f"VAR {names[0]} =") < task_text.index(f"VAR {names[4]} =")  # chain order kept


def test_common_words_prompt_and_answers(records):
    for record in records["cwe"]:
        assert record.answer_prefix == " Answer: The top 10 words that appear most often in the list are:"
        head = (
            "Below is a numbered list of words. In these words, some appear more often than others. Memorize the "
            "ones that appear most often.\n1. "
        )
        question = "\nQuestion: What are the 10 most common words in the above list?"
        assert record.prompt.startswith(head) and record.prompt.endswith(question)
        assert f"{question} Answer: The top 10 words that appear most often in the list are: 1. " in record.prompt
        real_list = record.prompt[record.prompt.rindex("Memorize the ones that appear most often.\n") :]
        counts = Counter(re.findall(r"\d+\. (\S+)", real_list.split("\n")[1]))
        assert all(counts[word] == 6 for word in record.answers)  # < 4096: common words repeat 6 times
        assert {word for word, _ in counts.most_common(10)} == set(record.answers)
        assert max(c for w, c in counts.items() if w not in record.answers) == 1


def test_frequent_words_prompt_and_answers(records):
    for record in records["fwe"]:
        assert record.answer_prefix == (
            " Answer: According to the coded text above, the three most frequently appeared words are:"
        )
        head = (
            "Read the following coded text and track the frequency of each coded word. Find the three most "
            "frequently appeared coded words. "
        )
        tail = (
            "\nQuestion: Do not provide any explanation. Please ignore the dots '....'. What are the three most "
            "frequently appeared words in the above coded text?"
        )
        assert record.prompt.startswith(head) and record.prompt.endswith(tail)
        ranked = [w for w, _ in Counter(record.prompt[len(head) : -len(tail)].split()).most_common(4)]
        assert ranked[0] == "..." and tuple(ranked[1:]) == record.answers


@pytest.mark.parametrize("task", list(TASKS))
def test_prompt_length_within_band(records, tokenizer, task):
    low, mean_low = (0.75, 0.85) if task == "fwe" else (0.85, 0.95)
    totals = []
    for record in records[task]:
        text = (
            tokenizer.apply_chat_template(
                [{"role": "user", "content": record.prompt}], tokenize=False, add_generation_prompt=True
            )
            + record.answer_prefix
        )
        num_tokens = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        assert num_tokens == record.metadata["num_tokens"]
        totals.append(num_tokens + TASKS[task].tokens_to_generate)
    assert all(low * TARGET <= t <= TARGET for t in totals), totals
    assert sum(totals) / len(totals) >= mean_low * TARGET, totals


def test_fixed_costs_do_not_cap_the_haystack(tokenizer):
    # vt carries a ~500-token solved example; charging it to the per-line estimate would cap the search at ~0.83 of
    # a 16K target.
    (record,) = RulerSource("vt", 16384, tokenizer, num_samples=1, seed=0)
    assert 0.99 * 16384 <= record.metadata["num_tokens"] + 30 <= 16384


def test_same_seed_same_records_and_different_seed_differs(tokenizer, records):
    again = list(RulerSource("vt", TARGET, tokenizer, num_samples=8, seed=7))
    assert again == records["vt"]
    fewer = list(RulerSource("vt", TARGET, tokenizer, num_samples=3, seed=7))
    assert fewer == records["vt"][:3]  # record i does not depend on how many follow
    other = list(RulerSource("vt", TARGET, tokenizer, num_samples=8, seed=8))
    assert [r.prompt for r in other] != [r.prompt for r in records["vt"]]
    assert len({r.prompt for r in records["vt"]}) == 8


def test_official_flag_and_metadata(records):
    for task, spec in TASKS.items():
        record = records[task][0]
        assert record.task == task
        assert record.metadata["official"] is spec.official
        assert record.metadata["official"] is (not task.endswith("_noise"))
        assert record.metadata["target_length"] == TARGET
    assert {t for t, s in TASKS.items() if s.official} == {
        "niah_single_1",
        "niah_multikey_2",
        "niah_multikey_3",
        "vt",
        "cwe",
        "fwe",
    }


def test_unknown_and_essay_tasks_are_clear_errors():
    with pytest.raises(ValueError, match=r"Unknown RULER task 'niah'.*'cwe'.*'vt'"):
        RulerSource("niah", TARGET)
    with pytest.raises(ValueError, match=r"essay haystack.*'niah_multivalue_noise'"):
        RulerSource("niah_multivalue", TARGET)
    with pytest.raises(ValueError, match="needs a tokenizer"):
        next(iter(RulerSource("vt", TARGET)))
    with pytest.raises(ValueError, match="tokens_to_generate=128"):
        RulerSource("niah_single_1", 100)


def test_binary_search_finds_largest_fitting_size():
    def measure(size):
        return 10 * size + 7

    # budget 1000: 10 * 99 + 7 = 997 fits, 100 -> 1007 does not.
    assert binary_search_size(measure, 1000, 5, 300) == 99
    assert binary_search_size(measure, 1000, 5, 50) == 50  # a binding upper bound caps the answer
    assert binary_search_size(measure, 40, 5, 10) is None  # even 5 units overflow


def test_linear_search_follows_fwe_procedure():
    # budget 1000, start 1000 // 6 = 166, step 1000 // 32 = 31, 4 tokens per word:
    # 166 -> 664, 197 -> 788, 228 -> 912, 259 -> 1036 (stop), step back -> 228.
    assert linear_search_size(lambda n: 4 * n, 1000, 166, 31) == 228


def test_zeta_matches_closed_forms():
    assert zeta(2.0) == pytest.approx(math.pi**2 / 6, rel=1e-14)
    assert zeta(4.0) == pytest.approx(math.pi**4 / 90, rel=1e-14)


def test_records_are_prompt_records(records):
    assert all(isinstance(r, PromptRecord) for rs in records.values() for r in rs)
