"""The transformers rollout engine on a tiny random Llama: grouping, trainer-reproducible log-probs, seeding, sync."""

from __future__ import annotations

import sys

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from longact_lightning.rl.logprobs import completion_logprobs
from longact_lightning.rollout import HFEngine, RolloutEngine, SamplingConfig, build_engine
from longact_lightning.rollout.base import GenerationInterrupted
from longact_lightning.rollout.batch import RolloutBatch

EOS, PAD = 2, 0
PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [14]]


def tiny_llama(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=48,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=EOS,
        pad_token_id=PAD,
    )
    return LlamaForCausalLM(config).eval()


def test_groups_prompts_and_finish_reasons():
    engine = HFEngine(tiny_llama(0))
    assert isinstance(engine, RolloutEngine)
    groups = engine.generate(PROMPTS, SamplingConfig(n=3, max_tokens=6, seed=0))
    assert [len(g) for g in groups] == [3, 3, 3]
    for prompt, group in zip(PROMPTS, groups):
        for rollout in group:
            assert rollout.prompt_ids == tuple(prompt)
            assert len(rollout.logprobs) == len(rollout.completion_ids) >= 1
            assert EOS not in rollout.completion_ids[:-1]  # cut right after the first EOS
            stopped = rollout.completion_ids[-1] == EOS
            assert rollout.finish_reason == ("stop" if stopped else "length")
            assert stopped or len(rollout.completion_ids) == 6


@pytest.mark.parametrize(("mode", "temperature", "scoring_temperature"), [("processed", 0.7, 0.7), ("raw", 0.7, 1.0)])
def test_logprobs_match_trainer_scoring(mode, temperature, scoring_temperature):
    """The engine's log-probs are what the RL module recomputes on the padded batch (top_p = 1)."""
    model = tiny_llama(1)
    engine = HFEngine(model, logprobs_mode=mode)
    groups = engine.generate(PROMPTS, SamplingConfig(n=2, temperature=temperature, max_tokens=8, seed=3))
    batch = RolloutBatch.from_groups(groups, [[0.0, 0.0]] * len(groups), pad_token_id=PAD)
    with torch.no_grad():
        trainer_logprobs, _ = completion_logprobs(
            model, batch.input_ids, batch.attention_mask, batch.completion_mask.shape[1], scoring_temperature
        )
    mask = batch.completion_mask.bool()
    torch.testing.assert_close(batch.engine_logprobs[mask], trainer_logprobs[mask], atol=1e-4, rtol=0)


def test_greedy_is_independent_of_padding_and_chunking():
    """Left padding (with positions from the mask) must not change a prompt's continuation."""
    model = tiny_llama(2)
    greedy = SamplingConfig(n=1, temperature=0.0, max_tokens=5)
    together = HFEngine(model, max_batch_sequences=64).generate(PROMPTS, greedy)
    one_by_one = HFEngine(model, max_batch_sequences=1).generate(PROMPTS, greedy)
    assert [g[0].completion_ids for g in together] == [g[0].completion_ids for g in one_by_one]


def test_seeded_runs_repeat_and_leave_global_rng_alone():
    sampling = SamplingConfig(n=2, max_tokens=6, seed=11)
    first = HFEngine(tiny_llama(0)).generate(PROMPTS, sampling)
    engine = HFEngine(tiny_llama(0))
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    second = engine.generate(PROMPTS, sampling)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert first == second


def test_generation_stops_within_a_token_of_the_request():
    engine = HFEngine(tiny_llama(0))
    polls = []

    def should_stop() -> bool:
        polls.append(1)
        return len(polls) >= 5

    with pytest.raises(GenerationInterrupted, match="after 5 tokens"):
        engine.generate(PROMPTS, SamplingConfig(n=2, max_tokens=40, seed=0), should_stop=should_stop)
    full = engine.generate(PROMPTS, SamplingConfig(n=2, max_tokens=40, seed=0), should_stop=lambda: False)
    assert [len(group) for group in full] == [2, 2, 2]


def test_load_weights_copies_in_place_and_skips_shared_tensors():
    policy, engine_model = tiny_llama(0), tiny_llama(1)
    engine = HFEngine(engine_model)
    storage = engine_model.model.embed_tokens.weight.data_ptr()
    engine.load_weights(policy.named_parameters())
    for (name, theirs), (_, ours) in zip(policy.named_parameters(), engine_model.named_parameters()):
        assert torch.equal(theirs, ours), name
    assert engine_model.model.embed_tokens.weight.data_ptr() == storage  # in place: no new tensors
    assert engine_model.lm_head.weight is engine_model.model.embed_tokens.weight  # still tied

    shared = HFEngine(policy)
    shared.load_weights(policy.named_parameters())  # a no-op, not a self-copy
    with pytest.raises(KeyError, match="not_a.weight"):
        shared.load_weights([("not_a.weight", torch.zeros(1))])


def test_build_engine_falls_back_to_hf_when_vllm_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # makes `import vllm` raise ImportError
    with pytest.warns(UserWarning, match=r"vLLM cannot be imported.*ignoring \['gpu_memory_utilization'\]"):
        engine = build_engine("vllm", tiny_llama(0), gpu_memory_utilization=0.5)
    assert isinstance(engine, HFEngine)
