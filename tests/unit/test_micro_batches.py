"""Token-budget micro-batches: every row once, whole groups while they fit, the budget kept (padding included)."""

from __future__ import annotations

import pytest
import torch

from longact_lightning.rl.micro_batches import balanced_partition, group_costs, plan_micro_batches


def _batch(prompts: list[int], completions: list[list[int]]):
    """Groups with the given real prompt lengths and completion lengths, left/right padded like a RolloutBatch."""
    P, C = max(prompts), max(max(c) for c in completions)
    masks, groups = [], []
    for group, (prompt, lengths) in enumerate(zip(prompts, completions)):
        for length in lengths:
            mask = torch.zeros(P + C, dtype=torch.long)
            mask[P - prompt : P + length] = 1
            masks.append(mask)
            groups.append(group)
    return torch.stack(masks), P, torch.tensor(groups)


def _cost(mask, P, groups, rows, share_prompt):
    """What the scoring passes of these rows process, padding included (the quantity the budget bounds)."""
    if not share_prompt:
        return len(rows) * mask.shape[1]
    by_group: dict[int, list[int]] = {}
    for row in rows:
        by_group.setdefault(int(groups[row]), []).append(row)
    prompt = max(int(mask[r[0], :P].sum()) for r in by_group.values())
    packed = max(int(mask[r, P:].sum()) for r in by_group.values())
    return len(by_group) * (prompt + packed)


@pytest.mark.parametrize("share_prompt", [True, False])
@pytest.mark.parametrize("budget", [20, 40, 100, 1000])
def test_every_row_once_within_budget(share_prompt, budget):
    mask, P, groups = _batch([12, 5, 30, 8], [[3, 9, 4, 1], [2, 2, 2, 2], [7, 0, 5, 6], [10, 10, 1, 3]])
    plan = plan_micro_batches(mask, P, groups, budget, share_prompt)
    assert sorted(row for micro in plan for row in micro) == list(range(len(groups)))
    for micro in plan:
        assert micro == sorted(micro)
        cost = _cost(mask, P, groups, micro, share_prompt)
        assert cost <= budget or len(micro) == 1, (micro, cost)


def test_whole_groups_go_together_and_a_large_group_is_split_in_parts():
    mask, P, groups = _batch([10, 10, 4], [[5, 5], [20, 20], [1, 1]])
    # group 0 costs 10 + 10 = 20, group 1 is 10 + 40 (split into 10 + 20 twice), group 2 costs 4 + 2
    plan = plan_micro_batches(mask, P, groups, 30, share_prompt=True)
    assert [0, 1] in plan or [0, 1, 4, 5] in plan
    assert [2] in plan and [3] in plan


def test_a_sequence_longer_than_the_budget_runs_alone():
    mask, P, groups = _batch([50, 2], [[10], [1, 1]])
    plan = plan_micro_batches(mask, P, groups, 20, share_prompt=True)
    assert plan == [[0], [1, 2]]


def test_a_budget_below_one_is_rejected():
    mask, P, groups = _batch([3], [[1]])
    with pytest.raises(ValueError, match="max_tokens_per_micro_batch=0"):
        plan_micro_batches(mask, P, groups, 0, share_prompt=True)


def test_groups_are_dealt_to_ranks_by_tokens_largest_first():
    assert balanced_partition([10, 1, 7, 3, 3, 2], 2) == [[0, 4], [1, 2, 3, 5]]  # 13 and 13 tokens
    assert balanced_partition([5, 5], 3) == [[0], [1], []]
    parts = balanced_partition(list(range(1, 40)), 4)
    loads = [sum(range(1, 40)[i] for i in part) for part in parts]
    assert sorted(i for part in parts for i in part) == list(range(39)) and max(loads) - min(loads) <= 1


def test_a_group_costs_its_prompt_once_with_sharing_and_per_row_without():
    mask, P, groups = _batch([10, 4], [[5, 3], [2]])
    assert group_costs(mask, P, groups, share_prompt=True) == {0: ([0, 1], 10 + 5 + 3), 1: ([2], 4 + 2)}
    assert group_costs(mask, P, groups, share_prompt=False) == {0: ([0, 1], 15 + 13), 1: ([2], 6)}


def test_concatenated_batches_repad_and_keep_groups_apart():
    from longact_lightning.rollout import Rollout, RolloutBatch

    def batch(prompt, completions, reward):
        group = [Rollout(prompt, c, tuple(0.5 for _ in c), "stop") for c in completions]
        return RolloutBatch.from_groups([group], [[reward] * len(group)], pad_token_id=0)

    a, b = batch((5, 6), [(7,), (8, 9)], 1.0), batch((3, 4, 5, 6), [(7, 8, 9)], 0.0)
    both = RolloutBatch.concat([a, b])
    assert both.input_ids.tolist() == [[0, 0, 5, 6, 7, 0, 0], [0, 0, 5, 6, 8, 9, 0], [3, 4, 5, 6, 7, 8, 9]]
    assert both.attention_mask.sum(-1).tolist() == [3, 4, 7]
    assert both.completion_mask.tolist() == [[1, 0, 0], [1, 1, 0], [1, 1, 1]]
    assert both.engine_logprobs.tolist() == [[0.5, 0, 0], [0.5, 0.5, 0], [0.5, 0.5, 0.5]]
    assert both.group_ids.tolist() == [0, 0, 1] and both.rewards.tolist() == [1.0, 1.0, 0.0]
