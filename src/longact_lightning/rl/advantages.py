"""Group-relative advantages: one scalar per sequence, computed from the rewards of its group of ``G`` siblings.

GRPO needs no value network because the other samples of the same prompt are the baseline. The variants differ in
the baseline (group mean vs. leave-one-out mean) and in the scale (group std, batch std, or none — Dr.GRPO argues the
std division biases the update towards too-easy and too-hard prompts). All stds are Bessel-corrected, as in TRL,
verl, OpenRLHF and NeMo-RL.
"""

from __future__ import annotations

from typing import Literal

import torch

StdScaling = Literal["group", "batch", "none"]


def group_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    std_scaling: StdScaling = "group",
    eps: float = 1e-6,
    leave_one_out: bool = False,
) -> torch.Tensor:
    """Advantage of each sequence relative to its group.

    ``A_i = (r_i - b_i) / (s + eps)`` where the baseline ``b_i`` is the group mean (or, with ``leave_one_out``, the
    mean of the *other* ``G - 1`` rewards, so ``r_i - b_i = G / (G - 1) * (r_i - mean)``) and the scale ``s`` is the
    group's Bessel std (``"group"``), the Bessel std of all rewards in the batch (``"batch"``, Lite-PPO), or ``s = 1``
    with no epsilon (``"none"``, Dr.GRPO). A group of one sample has no baseline to compare against: its advantage is 0
    (its std counts as 0 and, with leave-one-out, its baseline is its own reward).

    Args:
        rewards: ``[B]`` scalar reward per sequence.
        group_ids: ``[B]`` integer group (prompt) index per sequence; groups need not be contiguous.
        std_scaling: which std divides the centred reward.
        eps: added to the std so that zero-variance groups give 0 instead of NaN.
        leave_one_out: use the mean of the other samples as the baseline (RLOO).

    Returns:
        ``[B]`` float32 advantages.
    """
    if std_scaling not in ("group", "batch", "none"):
        raise ValueError(f"std_scaling={std_scaling!r} is not supported; use 'group', 'batch' or 'none'.")
    if rewards.shape != group_ids.shape or rewards.dim() != 1:
        raise ValueError(
            f"rewards {tuple(rewards.shape)} and group_ids {tuple(group_ids.shape)} must both be [B]; "
            "pass one reward and one group id per sequence."
        )
    # float64 inside: sums and squares of rewards near float32's range would overflow into inf - inf = NaN
    rewards = rewards.double()
    _, inverse = torch.unique(group_ids, return_inverse=True)  # [B] dense group index
    num_groups = int(inverse.max()) + 1
    count = rewards.new_zeros(num_groups).index_add_(0, inverse, torch.ones_like(rewards))  # [n]
    total = rewards.new_zeros(num_groups).index_add_(0, inverse, rewards)  # [n]
    mean = (total / count)[inverse]  # [B]
    size = count[inverse]  # [B]

    if leave_one_out:
        others = (size - 1).clamp(min=1)  # [B]
        baseline = torch.where(size > 1, (total[inverse] - rewards) / others, rewards)  # [B]
    else:
        baseline = mean
    centred = rewards - baseline  # [B]

    if std_scaling == "none":
        return centred.float()
    if std_scaling == "batch":
        std = rewards.std(unbiased=True) if rewards.numel() > 1 else rewards.new_zeros(())
        return (centred / (std + eps)).float()
    squares = rewards.new_zeros(num_groups).index_add_(0, inverse, (rewards - mean) ** 2)  # [n]
    group_std = (squares / (count - 1).clamp(min=1)).sqrt()[inverse]  # [B], 0 for groups of one
    return (centred / (group_std + eps)).float()
