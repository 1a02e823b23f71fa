"""Offline RULER-style synthetic tasks, sized to a target token length with the policy's tokenizer.

RULER (NVIDIA/RULER @ c3f5e3b, Apache-2.0) is the standard long-context probe, and its scores mean something only if
the prompts are the official ones. So this module keeps RULER's exact templates and answer prefixes, its needle /
chain / word-list constructions, and its haystack-size search (largest haystack whose prompt plus
``tokens_to_generate`` fits the target), and it regenerates them here, offline, from a seed. Facts are in
``shared/reference/benchmarks.md`` section 1; the code is our own.

Tasks that need no downloaded text are official: ``niah_single_1`` (noise haystack), ``niah_multikey_2`` and
``niah_multikey_3`` (distractor-needle haystack), ``vt``, ``cwe``, ``fwe``. The niah tasks RULER runs on Paul Graham
essays (not redistributable, so not shipped) are offered on the noise haystack under a ``_noise`` suffix and with
``metadata["official"] = False``: same needles and questions, scores not comparable with published RULER numbers.

Deliberate differences from the RULER scripts, none of which changes a template or a metric:

* Randomness comes from ``random.Random`` seeded per sample (``seed``, task, index), so record ``i`` does not depend
  on how many retries earlier records needed; RULER draws from one global stream. Same seed, same records.
* Needle keys are drawn distinct from each other and from distractor keys, and the variable-tracking example's
  value from the real one, so every question has one answer (RULER leaves such collisions to chance).
* The binary search's upper bound comes from the per-line cost measured by differencing two probes, so fixed costs
  (template, vt's solved example) cannot cap the haystack below the target (see :func:`_lines_size`).
* A word key ``adjective-noun`` draws the two words independently, the same distribution as RULER's sampling from
  the full adjective × noun product, without building its 6 M strings.
* The counted text is the chat-templated user message plus the answer prefix (RULER counts the same text, with the
  model template written around the task template). Few-shot examples (vt, cwe) sit inside the user message in
  their bare form; RULER's cwe example also carries the model's chat template. RULER's singular rewrite also edits
  the chat template (a quirk); here it edits only the task template and answer prefix.
"""

from __future__ import annotations

import math
import random
import re
import string
import uuid
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any, Literal, Protocol

from longact_lightning.data.records import PromptRecord
from longact_lightning.data.sources import PromptSource, resolve_tokenizer

# --- Official strings (scripts/data/synthetic/constants.py and the generators) -----------------------------------

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."

NIAH_TEMPLATE = (
    "Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {type_needle_v} afterwards.\n{context}\n"
    "What are all the special magic {type_needle_v} for {query} mentioned in the provided text?"
)
NIAH_ANSWER_PREFIX = " The special magic {type_needle_v} for {query} mentioned in the provided text are"
NIAH_NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."

VT_TEMPLATE = (
    "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
    "Question: Find all variables that are assigned the value {query} in the text above."
)
VT_ANSWER_PREFIX = (
    " Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are assigned "
    "the value {query}, they are: "
)

CWE_TEMPLATE = (
    "Below is a numbered list of words. In these words, some appear more often than others. Memorize the ones that "
    "appear most often.\n{context}\nQuestion: What are the 10 most common words in the above list?"
)
CWE_ANSWER_PREFIX = " Answer: The top 10 words that appear most often in the list are:"

FWE_TEMPLATE = (
    "Read the following coded text and track the frequency of each coded word. Find the three most frequently "
    "appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore the dots '....'. "
    "What are the three most frequently appeared words in the above coded text?"
)
FWE_ANSWER_PREFIX = " Answer: According to the coded text above, the three most frequently appeared words are:"


def singular(text: str) -> str:
    """RULER's rewrite of the niah template for one queried value, applied in RULER's order."""
    return text.replace("Some", "A").replace("are all", "is").replace("are", "is").replace("answers", "answer")


# --- Task table (scripts/synthetic.yaml) -------------------------------------------------------------------------


@dataclass(frozen=True)
class NiahConfig:
    """One needle-in-a-haystack configuration: haystack kind, key/value types and needle counts."""

    haystack: Literal["noise", "needle"]
    type_k: Literal["words", "numbers", "uuids"]
    type_v: Literal["words", "numbers", "uuids"]
    num_k: int = 1
    num_v: int = 1
    num_q: int = 1


@dataclass(frozen=True)
class RulerTask:
    """A task: its generator family, RULER's ``tokens_to_generate`` and whether it matches the official config."""

    kind: Literal["niah", "vt", "cwe", "fwe"]
    tokens_to_generate: int
    official: bool
    niah: NiahConfig | None = None


TASKS: dict[str, RulerTask] = {
    "niah_single_1": RulerTask("niah", 128, True, NiahConfig("noise", "words", "numbers")),
    "niah_multikey_2": RulerTask("niah", 128, True, NiahConfig("needle", "words", "numbers")),
    "niah_multikey_3": RulerTask("niah", 128, True, NiahConfig("needle", "uuids", "uuids")),
    "vt": RulerTask("vt", 30, True),
    "cwe": RulerTask("cwe", 120, True),
    "fwe": RulerTask("fwe", 50, True),
    # RULER runs these on the essay haystack; on noise they are a different (easier) benchmark.
    "niah_single_2_noise": RulerTask("niah", 128, False, NiahConfig("noise", "words", "numbers")),
    "niah_single_3_noise": RulerTask("niah", 128, False, NiahConfig("noise", "words", "uuids")),
    "niah_multikey_1_noise": RulerTask("niah", 128, False, NiahConfig("noise", "words", "numbers", num_k=4)),
    "niah_multivalue_noise": RulerTask("niah", 128, False, NiahConfig("noise", "words", "numbers", num_v=4)),
    "niah_multiquery_noise": RulerTask("niah", 128, False, NiahConfig("noise", "words", "numbers", num_k=4, num_q=4)),
}
_ESSAY_TASKS = ("niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multivalue", "niah_multiquery")


# --- Generators ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """One generated instance before it becomes a record."""

    prompt: str
    answer_prefix: str
    answers: tuple[str, ...]


Measure = Callable[[int], int]
"""Prompt tokens (chat template and answer prefix included) of an instance with a given haystack size."""


class _Generator(Protocol):
    incremental: int  # RULER's search start and retry step
    min_size: int  # the smallest haystack an instance can be built on

    def sample(self, rng: random.Random, size: int) -> Sample: ...

    def initial_size(self, measure: Measure, budget: int) -> int | None: ...


@cache
def _wordlist(name: str) -> tuple[str, ...]:
    """A wonderwords list (``nounlist.txt`` ...), sorted and deduplicated as RULER uses it."""
    text = resources.files("wonderwords.assets").joinpath(name).read_text(encoding="utf-8")
    return tuple(sorted({line.strip() for line in text.splitlines() if line.strip()}))


def _draw(rng: random.Random, kind: str) -> str:
    if kind == "numbers":
        return str(rng.randint(10**6, 10**7 - 1))
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    return f"{rng.choice(_wordlist('adjectivelist.txt'))}-{rng.choice(_wordlist('nounlist.txt'))}"


def _draw_distinct(rng: random.Random, kind: str, count: int, exclude: Collection[str] = ()) -> list[str]:
    drawn: list[str] = []
    seen = set(exclude)
    while len(drawn) < count:
        item = _draw(rng, kind)
        if item not in seen:
            seen.add(item)
            drawn.append(item)
    return drawn


def binary_search_size(measure: Measure, budget: int, lower: int, upper: int) -> int | None:
    """RULER's binary search: the largest size in ``[lower, upper]`` whose prompt fits ``budget``, else ``None``.

    Args:
        measure: prompt tokens at a given size.
        budget: the most prompt tokens allowed (target length minus ``tokens_to_generate``).
        lower: the smallest size tried (RULER's ``incremental``).
        upper: the largest size tried (RULER: 3x, for cwe 2x, the size its tokens-per-unit estimate predicts).
    """
    best = None
    while lower <= upper:
        mid = (lower + upper) // 2
        if measure(mid) <= budget:
            best, lower = mid, mid + 1
        else:
            upper = mid - 1
    return best


def linear_search_size(measure: Measure, budget: int, start: int, step: int) -> int | None:
    """RULER's search for fwe: grow by ``step`` while the prompt is under ``budget``, then step back once.

    Coarser than the binary search (``step`` is 1/32 of the budget), kept because fwe's official lengths come from it.
    """
    size = start
    while measure(size) < budget:
        size += step
    size -= step
    return size if size > 0 else None


def _lines_size(measure: Measure, budget: int, incremental: int) -> int | None:
    """The binary search for haystacks of lines (niah, vt), up to 3x the size the per-line cost predicts.

    The per-line cost is the difference between probes of ``2 * incremental`` and ``incremental`` lines. RULER divides
    one probe's whole count by its size, which charges the template (and, were it not excluded, vt's 500-token
    example) to the lines and can leave the upper bound below the answer; differencing cancels fixed costs. Where
    RULER's bound does not bind, both searches return the same size.
    """
    per_line = max((measure(2 * incremental) - measure(incremental)) / incremental, 1.0)
    return binary_search_size(measure, budget, incremental, max(int(budget / per_line * 3), incremental * 2))


class _Niah:
    """Needles ``One of the special magic ... for {key} is: {value}.`` among noise lines or distractor needles."""

    def __init__(self, config: NiahConfig, target_length: int) -> None:
        self.config = config
        self.incremental = 5 if target_length < 4096 else 25
        self.min_size = config.num_k * config.num_v  # one distinct line position per needle
        single = config.num_q * config.num_v == 1
        self.template = singular(NIAH_TEMPLATE) if single else NIAH_TEMPLATE
        self.answer_prefix = singular(NIAH_ANSWER_PREFIX) if single else NIAH_ANSWER_PREFIX
        self.type_needle_v = config.type_v[:-1] if single else config.type_v

    def sample(self, rng: random.Random, size: int) -> Sample:
        c = self.config
        keys = _draw_distinct(rng, c.type_k, c.num_k)
        values = [[_draw(rng, c.type_v) for _ in range(c.num_v)] for _ in keys]
        needles = [
            NIAH_NEEDLE.format(type_needle_v=c.type_v, key=key, value=value)
            for key, key_values in zip(keys, values)
            for value in key_values
        ]
        rng.shuffle(needles)
        if c.haystack == "noise":
            lines = [NOISE] * size
        else:
            distractor_keys = _draw_distinct(rng, c.type_k, size, exclude=set(keys))
            lines = [
                NIAH_NEEDLE.format(type_needle_v=c.type_v, key=key, value=_draw(rng, c.type_v))
                for key in distractor_keys
            ]
        for position, needle in zip(sorted(rng.sample(range(size), len(needles)), reverse=True), needles):
            lines.insert(position, needle)
        queried = rng.sample(range(c.num_k), c.num_q)
        queries = [keys[i] for i in queried]
        query = queries[0] if len(queries) == 1 else ", ".join(queries[:-1]) + ", and " + queries[-1]
        fields = {"type_needle_v": self.type_needle_v, "query": query}
        return Sample(
            prompt=self.template.format(context="\n".join(lines), **fields),
            answer_prefix=self.answer_prefix.format(**fields),
            answers=tuple(value for i in queried for value in values[i]),
        )

    def initial_size(self, measure: Measure, budget: int) -> int | None:
        return _lines_size(measure, budget, self.incremental)


class _VariableTracking:
    """A chain ``VAR A = v``, ``VAR B = VAR A``, ... hidden among noise lines, after a one-shot example.

    RULER always prepends one solved example (3-letter names, value 12345, bare template), re-randomised per sample.
    """

    NUM_HOPS = 4
    ICL_LENGTH = 500
    ICL_VALUE = "12345"

    def __init__(self, target_length: int, icl: str = "", icl_names: tuple[str, ...] = ()) -> None:
        self.incremental = 5 if target_length < 4096 else 10
        self.min_size = self.NUM_HOPS + 1  # one distinct line position per chain link
        self.icl = icl
        self.icl_names = icl_names

    def _chain(self, rng: random.Random, name_length: int, value: str) -> tuple[list[str], list[str]]:
        names: list[str] = []
        while len(names) < self.NUM_HOPS + 1:
            name = "".join(rng.choices(string.ascii_uppercase, k=name_length))
            if name != "VAR" and name not in names:
                names.append(name)
        lines = [f"VAR {names[0]} = {value}"] + [f"VAR {names[j + 1]} = VAR {names[j]} " for j in range(self.NUM_HOPS)]
        return names, lines

    def _instance(self, rng: random.Random, size: int, name_length: int, value: str) -> tuple[Sample, list[str]]:
        names, chain = self._chain(rng, name_length, value)
        sentences = [NOISE] * size
        for offset, position in enumerate(sorted(rng.sample(range(size), len(chain)))):
            sentences.insert(position + offset, chain[offset])
        fields = {"num_v": self.NUM_HOPS + 1, "query": value}
        sample = Sample(
            prompt=VT_TEMPLATE.format(context="\n".join(sentences), **fields),
            answer_prefix=VT_ANSWER_PREFIX.format(**fields),
            answers=tuple(names),
        )
        return sample, names

    def icl_sample(self, rng: random.Random, size: int) -> tuple[Sample, list[str]]:
        """The solved example before re-randomisation (RULER: 500 tokens, bare template, nothing generated)."""
        return self._instance(rng, size, 3, self.ICL_VALUE)

    def sample(self, rng: random.Random, size: int) -> Sample:
        value = str(rng.randrange(10000, 99999))
        icl = self._randomized_icl(rng, exclude_value=value)
        sample, _ = self._instance(rng, size, 5, value)
        return Sample(prompt=icl + sample.prompt, answer_prefix=sample.answer_prefix, answers=sample.answers)

    def _randomized_icl(self, rng: random.Random, exclude_value: str) -> str:
        """Fresh names of the same length and a fresh value, so the example never repeats verbatim across samples."""
        icl = self.icl
        taken = set(self.icl_names) | {"VAR"}
        for name in self.icl_names:
            new = "".join(rng.choices(string.ascii_uppercase, k=len(name)))
            while new in taken:
                new = "".join(rng.choices(string.ascii_uppercase, k=len(name)))
            taken.add(new)
            icl = re.sub(rf"\b{name}\b", new, icl)
        value = exclude_value
        while value == exclude_value:
            value = str(rng.randrange(10000, 99999))
        return icl.replace(self.ICL_VALUE, value)

    def initial_size(self, measure: Measure, budget: int) -> int | None:
        return _lines_size(measure, budget, self.incremental)


class _CommonWords:
    """A numbered list where 10 words repeat often and the rest rarely, after one solved example."""

    PROBE = 4096
    NUM_COMMON = 10

    def __init__(self, target_length: int) -> None:
        self.incremental = 10
        self.min_size = self.NUM_COMMON
        self.vocabulary = tuple(
            sorted(set(_wordlist("nounlist.txt") + _wordlist("adjectivelist.txt") + _wordlist("verblist.txt")))
        )
        if target_length >= 4096:
            self.fewshot, self.common_repeats, self.uncommon_repeats = (40, 10, 3), 30, 3
        else:
            self.fewshot, self.common_repeats, self.uncommon_repeats = (20, 3, 1), 6, 1

    def _example(self, rng: random.Random, num_words: int, common: int, uncommon: int) -> tuple[str, list[str]]:
        words = rng.sample(self.vocabulary, num_words)
        listed = words[: self.NUM_COMMON] * common + words[self.NUM_COMMON :] * uncommon
        rng.shuffle(listed)
        return " ".join(f"{i + 1}. {word}" for i, word in enumerate(listed)), words[: self.NUM_COMMON]

    def sample(self, rng: random.Random, size: int) -> Sample:
        shot_context, shot_answers = self._example(rng, *self.fewshot)
        shot = (
            CWE_TEMPLATE.format(context=shot_context)
            + CWE_ANSWER_PREFIX
            + " "
            + " ".join(f"{i + 1}. {word}" for i, word in enumerate(shot_answers))
        )
        context, answers = self._example(rng, size, self.common_repeats, self.uncommon_repeats)
        return Sample(
            prompt=shot + "\n" + CWE_TEMPLATE.format(context=context),
            answer_prefix=CWE_ANSWER_PREFIX,
            answers=tuple(answers),
        )

    def initial_size(self, measure: Measure, budget: int) -> int | None:
        cap = len(self.vocabulary)
        per_word = measure(self.PROBE) / self.PROBE
        best = binary_search_size(measure, budget, self.incremental, min(int(budget // per_word) * 2, cap))
        if best == cap:
            raise ValueError(
                f"cwe would need more than the {cap} distinct wonderwords words to fill this target length "
                "(RULER then falls back to english_words.json, which is not shipped): lower target_length."
            )
        return best


def zeta(s: float) -> float:
    """Riemann zeta for ``s > 1`` (Euler–Maclaurin, ~1e-16 relative), RULER's fwe normaliser, without scipy."""
    if s <= 1:
        raise ValueError(f"zeta(s) needs s > 1, got {s}; fwe's alpha must be > 1.")
    n = 20
    head = sum(k**-s for k in range(1, n))
    tail = n ** (1 - s) / (s - 1) + n**-s / 2
    # Bernoulli corrections B2/2!, B4/4!, B6/6!, B8/8! with the rising factorials of s.
    for coefficient, order in ((1 / 12, 1), (-1 / 720, 3), (1 / 30240, 5), (-1 / 1209600, 7)):
        rising = math.prod(s + i for i in range(order))
        tail += coefficient * rising * n ** (-s - order)
    return head + tail


class _FrequentWords:
    """Random 6-letter "coded words" with Zipf-like counts; the answer is the 3 most frequent real ones."""

    ALPHA = 2.0
    WORD_LENGTH = 6

    def __init__(self, budget: int) -> None:
        self.vocab_size = budget // 50
        self.incremental = budget // 32
        self.min_size = 1
        if self.vocab_size < 5 or self.incremental < 1:
            raise ValueError(f"fwe needs a larger target_length (prompt budget {budget} tokens gives no word list).")

    def sample(self, rng: random.Random, size: int) -> Sample:
        vocab = sorted(
            {"".join(rng.choices(string.ascii_lowercase, k=self.WORD_LENGTH)) for _ in range(self.vocab_size)}
        )
        rng.shuffle(vocab)
        vocab[0] = "..."  # the most frequent "word" is noise, which the template tells the model to ignore
        norm = zeta(self.ALPHA)
        words = [word for rank, word in enumerate(vocab, start=1) for _ in range(int(size * rank**-self.ALPHA / norm))]
        rng.shuffle(words)
        return Sample(
            prompt=FWE_TEMPLATE.format(context=" ".join(words)),
            answer_prefix=FWE_ANSWER_PREFIX,
            answers=tuple(vocab[1:4]),
        )

    def initial_size(self, measure: Measure, budget: int) -> int | None:
        return linear_search_size(measure, budget, start=budget // 6, step=self.incremental)


# --- The source ---------------------------------------------------------------------------------------------------


class RulerSource(PromptSource):
    """``num_samples`` seeded instances of one RULER task, each as long as fits ``target_length`` tokens.

    The haystack size comes from RULER's search: the largest haystack whose prompt (chat template, task text,
    answer prefix) plus the task's ``tokens_to_generate`` fits in ``target_length`` tokens of ``tokenizer``; an
    instance that still overflows (random draws tokenize differently) retries with a smaller haystack.

    Args:
        task: one of :data:`TASKS`.
        target_length: token budget per instance, ``tokens_to_generate`` included (RULER's ``max_seq_length``).
        tokenizer: the policy's tokenizer or its name; may come later through :meth:`connect`.
        num_samples: instances to generate (RULER: 500).
        seed: base seed (RULER: 42); the same seed and tokenizer give identical records.
        chat_template: count tokens on the tokenizer's chat template around the prompt, as the policy will see it;
            ignored when the tokenizer has none (RULER's ``base`` template).

    Raises:
        ValueError: for an unknown task (the message lists the valid ones) or an impossible budget.
    """

    def __init__(
        self,
        task: str,
        target_length: int,
        tokenizer: Any = None,
        num_samples: int = 500,
        seed: int = 42,
        chat_template: bool = True,
    ) -> None:
        if task in _ESSAY_TASKS:
            raise ValueError(
                f"RULER task {task!r} needs the Paul Graham essay haystack, which is not shipped; use "
                f"{task + '_noise'!r} (same needles on the noise haystack, labelled non-official)."
            )
        if task not in TASKS:
            raise ValueError(f"Unknown RULER task {task!r}; valid tasks: {sorted(TASKS)}.")
        spec = TASKS[task]
        if target_length <= spec.tokens_to_generate:
            raise ValueError(
                f"target_length={target_length} must exceed {task}'s tokens_to_generate={spec.tokens_to_generate}."
            )
        if num_samples < 1:
            raise ValueError(f"num_samples={num_samples} must be >= 1.")
        self.task = task
        self.spec = spec
        self.target_length = target_length
        self.tokenizer = tokenizer
        self.num_samples = num_samples
        self.seed = seed
        self.chat_template = chat_template
        self._plan: tuple[_Generator, int] | None = None

    def connect(self, tokenizer: Any) -> None:
        """Use the policy's tokenizer for sizing unless one was given explicitly."""
        if self.tokenizer is None:
            self.tokenizer = tokenizer
            self._plan = None

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[PromptRecord]:
        generator, size = self._sized_generator()
        for index in range(self.num_samples):
            yield self._record(generator, size, index)

    def count_tokens(self, prompt: str, answer_prefix: str, chat_template: bool | None = None) -> int:
        """Tokens of the text the policy sees before generating: chat template(prompt) + answer prefix."""
        use_template = self.chat_template if chat_template is None else chat_template
        text = prompt
        if use_template and getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
        return len(self.tokenizer(text + answer_prefix, add_special_tokens=False)["input_ids"])

    def _rng(self, label: str | int) -> random.Random:
        return random.Random(f"longact-ruler:{self.task}:{self.seed}:{label}")

    def _sized_generator(self) -> tuple[_Generator, int]:
        if self._plan is not None:
            return self._plan
        if self.tokenizer is None:
            raise ValueError(
                "RulerSource needs a tokenizer to size its prompts: pass tokenizer= (a model name or tokenizer "
                "object) or let the DataModule call connect(tokenizer)."
            )
        self.tokenizer = resolve_tokenizer(self.tokenizer)
        budget = self.target_length - self.spec.tokens_to_generate
        generator = self._generator(budget)
        size = generator.initial_size(self._measure(generator.sample, self._rng("size")), budget)
        if size is None:
            raise ValueError(
                f"target_length={self.target_length} is too small for {self.task}: even the smallest haystack "
                f"({generator.incremental} units) overflows it. Raise target_length."
            )
        self._plan = (generator, size)
        return self._plan

    def _measure(
        self, sample: Callable[[random.Random, int], Sample], rng: random.Random, chat_template: bool | None = None
    ) -> Measure:
        """Prompt tokens per haystack size; every probe starts from the same RNG state, so sizes compare fairly."""
        state = rng.getstate()

        def measure(size: int) -> int:
            rng.setstate(state)
            instance = sample(rng, size)
            return self.count_tokens(instance.prompt, instance.answer_prefix, chat_template)

        return measure

    def _generator(self, budget: int) -> _Generator:
        spec = self.spec
        if spec.kind == "niah":
            assert spec.niah is not None  # every niah task in TASKS carries its NiahConfig
            return _Niah(spec.niah, self.target_length)
        if spec.kind == "cwe":
            return _CommonWords(self.target_length)
        if spec.kind == "fwe":
            return _FrequentWords(budget)
        return self._variable_tracking()

    def _variable_tracking(self) -> _VariableTracking:
        """Size and draw the one-shot example first (bare template, 500 tokens, nothing to generate), as RULER does."""
        plain = _VariableTracking(_VariableTracking.ICL_LENGTH)
        measure = self._measure(lambda rng, size: plain.icl_sample(rng, size)[0], self._rng("icl"), chat_template=False)
        size = _lines_size(measure, plain.ICL_LENGTH, plain.incremental)
        assert size is not None  # the smallest example (5 noise lines, ~840 characters) fits 500 subword tokens
        example, names = plain.icl_sample(self._rng("icl"), size)
        icl = example.prompt + example.answer_prefix + " " + " ".join(names) + "\n"
        return _VariableTracking(self.target_length, icl=icl, icl_names=tuple(names))

    def _record(self, generator: _Generator, size: int, index: int) -> PromptRecord:
        budget = self.target_length - self.spec.tokens_to_generate
        while True:
            sample = generator.sample(self._rng(index), size)
            num_tokens = self.count_tokens(sample.prompt, sample.answer_prefix)
            if num_tokens <= budget:
                break
            size -= generator.incremental
            if size < generator.min_size:
                raise ValueError(
                    f"{self.task} sample {index} does not fit target_length={self.target_length} even with the "
                    "smallest haystack. Raise target_length."
                )
        return PromptRecord(
            prompt=sample.prompt,
            answers=sample.answers,
            task=self.task,
            answer_prefix=sample.answer_prefix,
            metadata={
                "official": self.spec.official,
                "target_length": self.target_length,
                "tokens_to_generate": self.spec.tokens_to_generate,
                "num_tokens": num_tokens,
                "haystack_size": size,
                "seed": self.seed,
                "index": index,
            },
        )
