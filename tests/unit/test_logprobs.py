"""Encoding a group's shared prompt once gives the same log-probs and gradients as encoding it per row."""

from __future__ import annotations

import pytest
import torch

from longact_lightning.rl.logprobs import completion_logprobs, grouped_completion_logprobs, token_logprobs
from tests.helpers.batches import C, P, two_groups_of_three
from tests.helpers.models import TINY_CONFIGS, tiny_model


def _values_and_gradients(model, logprobs, entropy, real):
    """What the equivalence tests compare: real tokens' log-probs and entropies, and the parameters' gradients of an
    objective that uses both."""
    objective = (logprobs * real).sum() + 0.1 * (entropy * real).sum()
    grads = torch.autograd.grad(objective, list(model.parameters()), allow_unused=True)
    return logprobs[real], entropy[real], grads


def _assert_same(expected, actual, atol: float) -> None:
    (lp_a, ent_a, grads_a), (lp_b, ent_b, grads_b) = expected, actual
    torch.testing.assert_close(lp_b, lp_a, rtol=1e-5, atol=atol)
    torch.testing.assert_close(ent_b, ent_a, rtol=1e-5, atol=atol)
    for ga, gb in zip(grads_a, grads_b):
        if ga is not None:
            torch.testing.assert_close(gb, ga, rtol=1e-4, atol=atol)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", list(TINY_CONFIGS))
def test_grouped_equals_plain_values_and_gradients(arch, attention, checkpointing):
    """Also under activation checkpointing, where every layer of both grouped passes is replayed in backward."""
    model = tiny_model(arch).train()
    model.config._attn_implementation = attention
    ids, mask, groups = two_groups_of_three()
    real = mask[:, P:].bool()
    results = []
    for grouped in (False, True):
        if grouped:
            if checkpointing:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            logprobs, entropy = grouped_completion_logprobs(model, ids, mask, C, groups)
        else:
            logprobs, entropy = completion_logprobs(model, ids, mask, C)
        results.append(_values_and_gradients(model, logprobs, entropy, real))
    _assert_same(*results, atol=1e-5)


def test_grouped_under_checkpointing_shares_the_prompt_and_replays_each_layer_once():
    """Two passes forward, each replayed once in backward (so activations were not kept), with the prompt still run
    once per group, and the layers' cache flag restored afterwards."""
    model = tiny_model("llama_gqa").train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids, mask, groups = two_groups_of_three()
    shapes = []
    layer = model.model.layers[0]
    handle = layer.register_forward_pre_hook(lambda _, args: shapes.append(tuple(args[0].shape[:2])))
    logprobs, entropy = grouped_completion_logprobs(model, ids, mask, C, groups)
    forward = list(shapes)
    (logprobs.sum() + entropy.sum()).backward()
    handle.remove()
    assert forward == [(2, P - 1), (2, 13)]  # [groups, shared prompt], [groups, packed completions 5 + 3 + 5]
    assert sorted(shapes[2:]) == sorted(forward)  # both replayed in backward
    assert layer._can_checkpoint_with_cache is False


def _scrambled_groups():
    """Three groups whose rows interleave; one group's completions are all empty and one prompt is a single token."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 90, (7, P + C), generator=g)
    mask = torch.ones_like(ids)
    groups = torch.tensor([2, 0, 1, 0, 2, 1, 0])
    for group in range(3):
        rows = (groups == group).nonzero().squeeze(1)
        ids[rows, :P] = ids[rows[0], :P]
    mask[groups == 1, : P - 1] = 0  # group 1: a one-token prompt, nothing shared
    mask[groups == 2, P:] = 0  # group 2: no completion token at all
    mask[3, P + 2 :] = 0
    return ids, mask, groups


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_grouped_handles_interleaved_rows_empty_groups_and_one_token_prompts(attention):
    model = tiny_model("llama_gqa").train()
    model.config._attn_implementation = attention
    ids, mask, groups = _scrambled_groups()
    real = mask[:, P:].bool()
    grouped, grouped_entropy = grouped_completion_logprobs(model, ids, mask, C, groups)
    plain, plain_entropy = completion_logprobs(model, ids, mask, C)
    torch.testing.assert_close(grouped[real], plain[real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grouped_entropy[real], plain_entropy[real], rtol=1e-5, atol=1e-5)
    assert not grouped[~real].any()  # padding columns are left at 0


def test_grouped_runs_all_groups_in_one_prompt_pass_and_one_completion_pass():
    model = tiny_model("llama_gqa").train()
    ids, mask, groups = two_groups_of_three()
    batch_sizes = []
    handle = model.model.layers[0].register_forward_pre_hook(lambda _, args: batch_sizes.append(args[0].shape[0]))
    grouped_completion_logprobs(model, ids, mask, C, groups)
    handle.remove()
    assert batch_sizes == [2, 2]  # [groups, shared prompt] then [groups, packed completions]


def _score(grouped: bool, model, ids, mask, groups, pad_to_multiple_of: int = 1):
    if grouped:
        return grouped_completion_logprobs(model, ids, mask, C, groups, pad_to_multiple_of=pad_to_multiple_of)
    return completion_logprobs(model, ids, mask, C, pad_to_multiple_of=pad_to_multiple_of)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize(
    ("grouped", "lengths"),
    [(True, [6, 13, 8, 16]), (False, [12, 16])],  # grouped: shared prompt 6, packed completions 13; plain: P + C = 12
)
def test_padding_to_a_multiple_rounds_every_pass_and_changes_no_value_or_gradient(attention, grouped, lengths):
    model = tiny_model("llama_gqa").train()
    model.config._attn_implementation = attention
    ids, mask, groups = two_groups_of_three()
    real = mask[:, P:].bool()
    results, seen = [], []
    handle = model.model.layers[0].register_forward_pre_hook(lambda _, args: seen.append(args[0].shape[1]))
    for multiple in (1, 8):
        logprobs, entropy = _score(grouped, model, ids, mask, groups, multiple)
        results.append(_values_and_gradients(model, logprobs, entropy, real))
    handle.remove()
    assert seen == lengths
    _assert_same(*results, atol=1e-6)


@pytest.mark.parametrize("grouped", [True, False])
def test_padding_to_a_multiple_below_one_is_rejected(grouped):
    ids, mask, groups = two_groups_of_three()
    with pytest.raises(ValueError, match="pad_to_multiple_of=0"):
        _score(grouped, tiny_model("llama_gqa"), ids, mask, groups, 0)


def test_grouped_rejects_rows_of_one_group_with_different_prompts():
    ids, mask, groups = two_groups_of_three()
    ids[1, P - 1] += 1
    with pytest.raises(ValueError, match="different prompts"):
        grouped_completion_logprobs(tiny_model("llama_gqa"), ids, mask, C, groups)


def test_grouped_rejects_a_prompt_without_real_tokens():
    ids, mask, groups = two_groups_of_three()
    mask[3:, :P] = 0
    with pytest.raises(ValueError, match="no real token"):
        grouped_completion_logprobs(tiny_model("llama_gqa"), ids, mask, C, groups)


def test_grouped_with_a_one_token_prompt_is_the_plain_computation():
    model = tiny_model("llama_gqa").train()
    ids = torch.randint(3, 90, (2, 1 + C), generator=torch.Generator().manual_seed(2))
    ids[1, 0] = ids[0, 0]
    mask = torch.ones_like(ids)
    grouped, _ = grouped_completion_logprobs(model, ids, mask, C, torch.tensor([0, 0]))
    plain, _ = completion_logprobs(model, ids, mask, C)
    # Equal up to rounding: the two paths multiply matrices of different shapes, which AVX2 kernels block (and so
    # round) differently; an off-by-one position would differ by ~0.1.
    torch.testing.assert_close(grouped, plain, rtol=1e-6, atol=1e-6)


def test_grouped_falls_back_to_plain_for_attention_without_4d_masks(monkeypatch):
    model = tiny_model("llama_gqa")
    model.config._attn_implementation = "flash_attention_2"
    ids, mask, groups = two_groups_of_three()
    monkeypatch.setattr("longact_lightning.rl.logprobs.completion_logprobs", lambda *args: "plain")
    assert grouped_completion_logprobs(model, ids, mask, C, groups) == "plain"


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunk", [1, 5, 7, 100])
def test_vocabulary_in_chunks_gives_the_unchunked_values_and_gradients(chunk, temperature):
    logits = torch.randn(3, 7, 96, generator=torch.Generator().manual_seed(3), requires_grad=True)
    targets = torch.randint(0, 96, (3, 7), generator=torch.Generator().manual_seed(4))
    results = []
    for chunk_tokens in (None, chunk):
        logprobs, entropy = token_logprobs(logits, targets, temperature, True, chunk_tokens)
        (grad,) = torch.autograd.grad(logprobs.sum() + 0.3 * entropy.sum(), logits)
        results.append((logprobs, entropy, grad))
    for expected, actual in zip(*results):
        torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-6)
    logprobs, entropy = token_logprobs(logits.detach(), targets, temperature, False, chunk)
    assert entropy is None and torch.allclose(logprobs, results[0][0])


@pytest.mark.parametrize("grouped", [True, False])
def test_scoring_with_vocabulary_chunks_changes_no_value_or_gradient(grouped):
    model = tiny_model("qwen3").train()
    ids, mask, groups = two_groups_of_three()
    real = mask[:, P:].bool()
    results = []
    for chunk_tokens in (None, 4):
        if grouped:
            logprobs, entropy = grouped_completion_logprobs(model, ids, mask, C, groups, chunk_tokens=chunk_tokens)
        else:
            logprobs, entropy = completion_logprobs(model, ids, mask, C, chunk_tokens=chunk_tokens)
        results.append(_values_and_gradients(model, logprobs, entropy, real))
    _assert_same(*results, atol=1e-6)


def test_vocabulary_chunks_below_one_are_rejected():
    ids, mask, groups = two_groups_of_three()
    with pytest.raises(ValueError, match="chunk_tokens=0"):
        grouped_completion_logprobs(tiny_model("llama_gqa"), ids, mask, C, groups, chunk_tokens=0)
