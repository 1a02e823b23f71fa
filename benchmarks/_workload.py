"""The reference RL workload both sides of every comparison run: needle-in-noise prompts, substring reward.

SmolLM2-135M-Instruct, DAPO (eps 0.2 / 0.28, no KL), 4 prompts x 4 generations per step, <= 32 new tokens, lr 1e-6.
Each prompt is a RULER-style noise paragraph repeated ``repeats`` times (24 tokens each; the default 20 gives the
~545-token prompts of the original comparison) with one 6-digit magic number at a random position.
"""

from __future__ import annotations

import random

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
TOKENS_PER_REPEAT, OTHER_TOKENS = 24, 64  # SmolLM2's tokenizer (measured): per repeat; the template and question
DEFAULT_REPEATS = 20
PROMPTS_PER_STEP, GROUP_SIZE, MAX_NEW_TOKENS, LEARNING_RATE = 4, 4, 32, 1e-6


def make_prompt(rng: random.Random, repeats: int = DEFAULT_REPEATS) -> dict:
    """One prompt (the user message) and its answer."""
    key = rng.randint(100000, 999999)
    hay = NOISE * repeats
    position = rng.randint(0, len(hay))
    context = hay[:position] + f" The special magic number is: {key}. " + hay[position:]
    question = context + "\nWhat is the special magic number mentioned in the text above? Answer with the number only."
    return {"prompt": question, "answer": str(key)}


def prompts(count: int, repeats: int = DEFAULT_REPEATS) -> list[dict]:
    """The first ``count`` prompts of the seeded stream (the same on both sides)."""
    rng = random.Random(0)
    return [make_prompt(rng, repeats) for _ in range(count)]


def repeats_for(prompt_tokens: int) -> int:
    """Noise repeats for prompts of at most about ``prompt_tokens`` tokens (chat template included)."""
    return max(1, (prompt_tokens - OTHER_TOKENS) // TOKENS_PER_REPEAT)
