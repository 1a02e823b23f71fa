"""InfiniteBench's synthetic retrieval tasks (passkey, number_string, kv_retrieval), generated offline at any length.

InfiniteBench (Zhang et al., 2024) ships these three tasks at 128k tokens; they are synthetic, so this module builds
them at the length a run needs, following the repository's own builders (``data/construct_synthetic_dataset.py``):
the same noise line, needle sentences, digit keys and JSON of UUID pairs, filled into its GPT-4 prompt templates
(``src/prompt.py``: ``"{instruction}\\n\\n{context}\\n\\n{input}"``), and scored by its scorers
(``src/compute_scores.py``): the first run of digits in the prediction must equal the key (passkey, number_string),
or the value must be one of the prediction's words once ``\\n : " ' . , ? ! { }`` are spaces (kv_retrieval).
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterator
from typing import Any

from longact_lightning.data.records import PromptRecord, chat_prompt_ids
from longact_lightning.data.sources import PromptSource, resolve_tokenizer

TASKS = ("passkey", "number_string", "kv_retrieval")
# tokens to generate per task (the official evaluation's max_new_tokens)
MAX_NEW_TOKENS = {"passkey": 6, "number_string": 12, "kv_retrieval": 50}

INSTRUCTIONS = {
    "passkey": "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. I will "
    "quiz you about the important information there.",
    "number_string": "There is an important info hidden inside a lot of irrelevant text. Find it. I will quiz you "
    "about the important information there.",
    "kv_retrieval": "Extract the value corresponding to the specified key in the JSON object below.",
}
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n"
NEEDLES = {
    "passkey": "The pass key is {key}. Remember it. {key} is the pass key.\n",
    "number_string": "The sequence of digits is {key}. Remember it. {key} is the sequence of digits.\n",
}
QUESTIONS = {"passkey": "What is the pass key?", "number_string": "What is the sequence of digits?"}


def first_int_match(prediction: str) -> str:
    """The first run of digits in ``prediction`` ("" if none): what passkey and number_string compare to the key."""
    for part in "".join(c if c.isdigit() else " " for c in prediction).split():
        return part
    return ""


def retrieval_words(prediction: str) -> list[str]:
    """The prediction's words once newlines and ``: " ' . , ? ! { }`` are spaces (kv_retrieval's scorer)."""
    for c in ["\n", ":", '"', "'", ".", ",", "?", "!", "{", "}"]:
        prediction = prediction.replace(c, " ")
    return prediction.split()


def passkey_key(rng: random.Random) -> str:
    """Five random digits."""
    return "".join(str(rng.randint(0, 9)) for _ in range(5))


def number_string_key(rng: random.Random) -> str:
    """Five random digits, then five times a digit repeated in place: ten digits with runs (the builder's way)."""
    keys = [str(rng.randint(0, 9)) for _ in range(5)]
    for k in range(5):
        position = rng.randint(0, 5 + k - 1)
        keys.insert(position, keys[position])
    return "".join(keys)


def build(task: str, units: int, rng: random.Random) -> tuple[str, str]:
    """One instance with ``units`` noise lines (passkey, number_string) or key-value pairs (kv_retrieval): the prompt
    and the answer."""
    if task == "kv_retrieval":
        pairs = [(_uuid(rng), _uuid(rng)) for _ in range(max(units, 1))]
        key, value = pairs[rng.randrange(len(pairs))]
        context = "JSON data:\n{" + ", ".join(f'"{k}": "{v}"' for k, v in pairs) + "}"
        question = f'Key: "{key}"\nThe value associated with the specified key is: '
        return f"{INSTRUCTIONS[task]}\n\n{context}\n\n{question}", value
    key = passkey_key(rng) if task == "passkey" else number_string_key(rng)
    before = rng.randint(0, units)  # the needle's depth: noise lines before it
    context = NOISE * before + NEEDLES[task].replace("{key}", key) + NOISE * (units - before)
    return f"{INSTRUCTIONS[task]}\n\n{context}\n\n{QUESTIONS[task]}", key


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


class InfiniteBenchSource(PromptSource):
    """``num_samples`` seeded instances of one InfiniteBench synthetic task, each about ``target_length`` tokens.

    The number of noise lines (or key-value pairs) is the largest whose prompt, in ``tokenizer``'s chat template,
    fits ``target_length`` tokens; the needle's depth is drawn per instance.

    Args:
        task: one of :data:`TASKS`.
        target_length: prompt tokens per instance (chat template included).
        tokenizer: the policy's tokenizer or its name; may come later through :meth:`connect`.
        num_samples: instances to generate.
        seed: base seed; the same seed and tokenizer give identical records.
    """

    def __init__(
        self, task: str, target_length: int, tokenizer: Any = None, num_samples: int = 100, seed: int = 42
    ) -> None:
        if task not in TASKS:
            raise ValueError(f"Unknown InfiniteBench task {task!r}; the synthetic ones are {list(TASKS)}.")
        if target_length < 64:
            raise ValueError(f"target_length={target_length} must be >= 64 tokens (the instructions alone take ~40).")
        if num_samples < 1:
            raise ValueError(f"num_samples={num_samples} must be >= 1.")
        self.task, self.target_length, self.tokenizer = task, target_length, tokenizer
        self.num_samples, self.seed = num_samples, seed
        self._units: int | None = None

    def connect(self, tokenizer: Any) -> None:
        """Use the policy's tokenizer for sizing unless one was given explicitly."""
        if self.tokenizer is None:
            self.tokenizer = tokenizer
            self._units = None

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[PromptRecord]:
        units = self._sized_units()
        for index in range(self.num_samples):
            seed, n = f"{self.seed}/{self.task}/{index}", units
            prompt, answer = build(self.task, n, random.Random(seed))
            while n > 0 and self.count_tokens(prompt) > self.target_length:  # this draw tokenized longer
                n = int(n * 0.95)
                prompt, answer = build(self.task, n, random.Random(seed))
            yield PromptRecord(prompt=prompt, answers=(answer,), task=self.task, metadata={"index": index, "units": n})

    def count_tokens(self, prompt: str) -> int:
        """Tokens of the prompt as the policy sees it (its chat template, when the tokenizer has one)."""
        return len(chat_prompt_ids(self.tokenizer, PromptRecord(prompt=prompt, answers=(), task=self.task)))

    def _sized_units(self) -> int:
        if self._units is None:
            if self.tokenizer is None:
                raise ValueError(
                    f"InfiniteBenchSource({self.task!r}) needs a tokenizer to size its prompts: pass tokenizer= or let "
                    "the DataModule call connect(tokenizer)."
                )
            self.tokenizer = resolve_tokenizer(self.tokenizer)
            probe = random.Random(f"{self.seed}/{self.task}/size")
            base = self.count_tokens(build(self.task, 0, probe)[0])
            per_unit = (self.count_tokens(build(self.task, 100, probe)[0]) - base) / 100
            if base > self.target_length:
                raise ValueError(
                    f"target_length={self.target_length} is below the {base} tokens of an empty {self.task} prompt."
                )
            self._units = int((self.target_length - base) / per_unit)
        return self._units
