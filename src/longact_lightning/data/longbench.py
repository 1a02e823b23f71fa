"""LongBench v2 as the official ``pred.py`` / ``result.py`` define it: prompt, truncation, extraction, breakdowns.

Scores are comparable with the leaderboard only if every step matches the official scripts, so each function here
reproduces one of them exactly (THUDM/LongBench @ 2e00731, see ``shared/reference/benchmarks.md`` section 2):
the prompt is filled by sequential ``str.replace`` with stripped values, an over-long prompt loses its middle
(head ⌊max/2⌋ and tail ⌈max/2⌉ tokens), the answer letter comes from two regexes after removing ``*``, and a
response without a letter counts as wrong.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from lightning.pytorch.utilities import rank_zero_warn

from longact_lightning.data.records import PromptRecord
from longact_lightning.data.sources import PromptSource, load_hf_dataset, nonempty, resolve_tokenizer

TASK = "longbench_v2"
HUB_ID = "THUDM/LongBench-v2"

# prompts/0shot.txt, verbatim (the file has no trailing newline).
ZERO_SHOT_TEMPLATE = """Please read the following text and answer the question below.

<text>
$DOC$
</text>

What is the correct answer to this question: $Q$
Choices:
(A) $C_A$
(B) $C_B$
(C) $C_C$
(D) $C_D$

Format your response as follows: "The correct answer is (insert answer here)"."""

_PLACEHOLDERS = (
    ("$DOC$", "context"),
    ("$Q$", "question"),
    ("$C_A$", "choice_A"),
    ("$C_B$", "choice_B"),
    ("$C_C$", "choice_C"),
    ("$C_D$", "choice_D"),
)
_METADATA_FIELDS = ("_id", "domain", "sub_domain", "difficulty", "length")
BREAKDOWN_KEYS = ("overall", "easy", "hard", "short", "medium", "long")


def build_prompt(item: Mapping[str, Any], template: str = ZERO_SHOT_TEMPLATE) -> str:
    """Fill the template as ``pred.py`` does: one ``replace`` per placeholder, in order, each value stripped.

    The order matters when a value itself contains a later placeholder (a document quoting ``$Q$`` gets it
    replaced too), so it is kept, not "improved" into a single-pass format.
    """
    prompt = template
    for placeholder, field in _PLACEHOLDERS:
        prompt = prompt.replace(placeholder, item[field].strip())
    return prompt


def truncate_middle(prompt: str, tokenizer: Any, max_length: int) -> str:
    """Cut the middle of an over-long prompt, keeping ⌊max/2⌋ head and ⌈max/2⌉ tail tokens (``pred.py``).

    ``pred.py`` writes ``input_ids[:max_len//2] + input_ids[-max_len//2:]``; Python reads ``-max_len//2`` as
    ``(-max_len)//2``, which is why the tail gets the extra token for odd ``max_length``. The question and choices sit
    at the end of the prompt, so the tail is what must survive.

    Args:
        prompt: the filled prompt.
        tokenizer: a Hugging Face tokenizer (``encode`` / ``decode``).
        max_length: the largest number of prompt tokens kept.
    """
    if max_length < 2:
        raise ValueError(f"max_length={max_length} must be >= 2 to keep both a head and a tail of the prompt.")
    input_ids = tokenizer.encode(prompt)
    if len(input_ids) <= max_length:
        return prompt
    kept = input_ids[: max_length // 2] + input_ids[-(max_length - max_length // 2) :]
    return tokenizer.decode(kept, skip_special_tokens=True)


def extract_answer(response: str) -> str | None:
    """The chosen letter as ``pred.py`` extracts it, or ``None`` (scored as wrong).

    ``*`` is removed first (models bold their answer), then ``The correct answer is (X)`` is tried before
    ``The correct answer is X``; both case-sensitive, first match wins.
    """
    response = response.replace("*", "")
    match = re.search(r"The correct answer is \(([A-D])\)", response)
    if match is None:
        match = re.search(r"The correct answer is ([A-D])", response)
    return match.group(1) if match else None


def breakdown(results: Iterable[Mapping[str, Any]], compensated: bool = False) -> dict[str, float | None]:
    """Overall / easy / hard / short / medium / long accuracy in percent, as ``result.py`` computes them.

    Each bucket is a micro-average rounded to one decimal. ``difficulty`` other than ``"easy"`` counts as hard and
    ``length`` other than ``"short"`` / ``"medium"`` counts as long, exactly as ``result.py`` buckets them.

    Args:
        results: one mapping per scored item with ``difficulty``, ``length`` and ``judge`` (pred == answer); with
            ``compensated``, also ``pred``.
        compensated: ``result.py``'s option to score an item whose answer could not be extracted (``pred`` is
            ``None``) as 0.25, chance level.

    Returns:
        The six accuracies; a bucket with no item is ``None`` (``result.py`` would divide by zero).

    Raises:
        ValueError: if ``results`` is empty.
    """
    totals = dict.fromkeys(BREAKDOWN_KEYS[1:], 0.0)
    counts = dict.fromkeys(BREAKDOWN_KEYS[1:], 0)
    for item in results:
        acc = 0.25 if compensated and item["pred"] is None else float(int(item["judge"]))
        difficulty = "easy" if item["difficulty"] == "easy" else "hard"
        length = item["length"] if item["length"] in ("short", "medium") else "long"
        for bucket in (difficulty, length):
            totals[bucket] += acc
            counts[bucket] += 1
    num_items = counts["easy"] + counts["hard"]
    if num_items == 0:
        raise ValueError("breakdown() got no results: pass at least one scored item.")
    scores: dict[str, float | None] = {"overall": round(100 * (totals["easy"] + totals["hard"]) / num_items, 1)}
    for bucket in BREAKDOWN_KEYS[1:]:
        scores[bucket] = round(100 * totals[bucket] / counts[bucket], 1) if counts[bucket] else None
    return scores


class LongBenchV2Source(PromptSource):
    """LongBench v2 items as 0-shot prompts, middle-truncated to ``max_length`` tokens.

    Each record's answer is the gold letter; its metadata keeps ``_id``, ``domain``, ``sub_domain``, ``difficulty``
    and ``length`` for :func:`breakdown`.

    Args:
        path: ``THUDM/LongBench-v2`` (needs the hub or its cache), a local copy of ``data.json`` / the parquet
            export, or a local dataset directory.
        max_length: keep at most this many prompt tokens (``pred.py`` uses 120000 for most models); ``None`` keeps
            prompts whole.
        tokenizer: the policy's tokenizer or its name; needed only with ``max_length``, and may come later through
            :meth:`connect`.
        split: split to read (the hub dataset has only ``train``).
        load_kwargs: further ``load_dataset`` keywords (``cache_dir``, ``revision``, ...).
    """

    def __init__(
        self,
        path: str = HUB_ID,
        max_length: int | None = None,
        tokenizer: Any = None,
        split: str = "train",
        load_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if max_length is not None and max_length < 2:
            raise ValueError(f"max_length={max_length} must be >= 2 (or None to keep prompts whole).")
        self.path = path
        self.max_length = max_length
        self.tokenizer = tokenizer
        self.split = split
        self.load_kwargs = load_kwargs

    def connect(self, tokenizer: Any) -> None:
        """Use the policy's tokenizer for truncation unless one was given explicitly."""
        if self.tokenizer is None:
            self.tokenizer = tokenizer

    def __iter__(self) -> Iterator[PromptRecord]:
        if self.max_length is not None and self.tokenizer is None:
            raise ValueError(
                f"LongBenchV2Source(max_length={self.max_length}) needs a tokenizer to truncate: pass tokenizer= "
                "(a model name or tokenizer object) or let the DataModule call connect(tokenizer)."
            )
        self.tokenizer = resolve_tokenizer(self.tokenizer)
        dataset = load_hf_dataset(self.path, self.split, load_kwargs=self.load_kwargs)
        return nonempty(
            self._records(dataset),
            source=f"LongBench v2 at {self.path!r} (split {self.split!r})",
            fix=f"Point path at the hub id {HUB_ID!r} or a local data.json / parquet file holding its rows.",
        )

    def _records(self, dataset) -> Iterator[PromptRecord]:
        required = [field for _, field in _PLACEHOLDERS] + ["answer"]
        for index, item in enumerate(dataset):
            bad = [field for field in required if not isinstance(item.get(field), str)]
            if bad:  # a null or missing field costs its row, not the run
                found = {field: type(item.get(field)).__name__ for field in bad}
                rank_zero_warn(f"LongBench v2 row {index} at {self.path!r}: skipped, fields not text: {found}.")
                continue
            prompt = build_prompt(item)
            if self.max_length is not None:
                prompt = truncate_middle(prompt, self.tokenizer, self.max_length)
            yield PromptRecord(
                prompt=prompt,
                answers=(item["answer"],),
                task=TASK,
                metadata={field: item.get(field) for field in _METADATA_FIELDS},
            )
