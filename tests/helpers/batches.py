"""Small scoring batches whose layout (shared prompts, left and right padding) the log-prob tests rely on."""

from __future__ import annotations

import torch

P, C = 7, 5


def two_groups_of_three() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Six rows, two groups of three sharing a prompt; the second prompt is shorter, completions end unevenly."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 90, (6, P + C), generator=g)
    mask = torch.ones_like(ids)
    ids[:3, :P] = ids[0, :P]
    ids[3:, :P] = ids[3, :P]
    ids[3:, :2], mask[3:, :2] = 0, 0  # the second prompt is shorter: left padding
    mask[1, P + 3 :], mask[4, P + 1 :] = 0, 0  # completions of different lengths: right padding
    return ids, mask, torch.tensor([0, 0, 0, 1, 1, 1])
