"""One weight cast per optimizer step under Lightning's uncached autocast, and never a stale one."""

from __future__ import annotations

from contextlib import nullcontext

import torch

from longact_lightning.rl.logprobs import grouped_completion_logprobs
from longact_lightning.rl.precision import autocast_weights_once
from tests.helpers.batches import C, P, two_groups_of_three
from tests.helpers.models import tiny_model


def _two_steps_of_two_micro_batches(cast_once: bool) -> list[torch.Tensor]:
    """Log-probs of each micro-batch over two optimizer steps, all inside one uncached bf16 autocast region."""
    ids, mask, groups = two_groups_of_three()
    model = tiny_model("llama_gqa").train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
    seen = []
    with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):  # what Lightning's bf16-mixed does
        for _ in range(2):
            with autocast_weights_once("cpu") if cast_once else nullcontext():
                for rows in (slice(0, 3), slice(3, 6)):  # micro-batches, one backward each
                    logprobs, _ = grouped_completion_logprobs(model, ids[rows], mask[rows], C, groups[rows])
                    (logprobs * mask[rows, P:]).sum().backward()
                    seen.append(logprobs.detach())
            assert not torch.is_autocast_cache_enabled()
            optimizer.step()
            optimizer.zero_grad()
    return seen


def test_cast_once_per_step_matches_casting_per_pass_and_sees_each_update():
    cached, uncached = _two_steps_of_two_micro_batches(True), _two_steps_of_two_micro_batches(False)
    real = two_groups_of_three()[1][:, P:].bool()
    real = [real[:3], real[3:]] * 2
    step_change = max((b - a)[r].abs().max() for a, b, r in zip(cached[:2], cached[2:], real))
    assert step_change > 0.05  # the second step's passes saw the updated weights
    for a, b, r in zip(cached, uncached, real):  # one grad cast instead of two: bf16 rounding may differ slightly
        assert (a - b)[r].abs().max() < 0.1 * step_change


def test_cast_once_is_a_no_op_without_autocast_or_with_its_cache_on():
    with autocast_weights_once("cpu"):
        assert not torch.is_autocast_enabled("cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):  # cache on: left as the caller set it
        with autocast_weights_once("cpu"):
            assert torch.is_autocast_cache_enabled()
        assert torch.is_autocast_cache_enabled()
