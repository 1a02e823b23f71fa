"""Choose which query/key channels to update, and turn the choice into per-parameter row masks.

Selection happens within each projection matrix, over *units*: single channels (default), whole heads, or RoPE
pairs (channel ``i`` and ``i + rotary_dim/2`` of a head rotate together, so updating one without the other changes
half of a rotating 2-D subspace). The number of selected units is ``round_half_up(top_ratio * units)``, at least 1;
with channel units that is exactly ``round(top_ratio * channels)`` rows per matrix.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal

import torch

from longact_lightning.saliency.projections import QKProjection

SelectionMode = Literal["high", "low", "random", "none"]
Granularity = Literal["channel", "head", "rope_pair"]
SELECTION_MODES: tuple[str, ...] = ("high", "low", "random", "none")
GRANULARITIES: tuple[str, ...] = ("channel", "head", "rope_pair")


def validate_selection(top_ratio: float, mode: str, granularity: str) -> None:
    """Raise a ValueError naming the bad value and the allowed ones."""
    if not 0.0 < top_ratio <= 1.0:
        raise ValueError(f"top_ratio={top_ratio} must be in (0, 1]; the paper uses 0.3.")
    if mode not in SELECTION_MODES:
        raise ValueError(f"mode={mode!r} is not one of {SELECTION_MODES} ('high' is LongAct, 'none' uniform updates).")
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity={granularity!r} is not one of {GRANULARITIES}.")


def num_selected(units: int, top_ratio: float) -> int:
    """``round_half_up(top_ratio * units)``, at least 1 (Python's ``round`` rounds half to even)."""
    return max(1, math.floor(top_ratio * units + 0.5))


def channel_units(num_heads: int, head_dim: int, rotary_dim: int, granularity: Granularity) -> torch.Tensor:
    """``[channels]`` the unit index of each channel (channel order ``head * head_dim + dim``)."""
    channels = num_heads * head_dim
    if granularity == "channel":
        return torch.arange(channels)
    if granularity == "head":
        return torch.arange(num_heads).repeat_interleave(head_dim)
    half = rotary_dim // 2
    dim = torch.arange(head_dim)
    # Inside a head, pair p < half holds dims p and p + half; each unrotated dim (>= rotary_dim) is a unit of its own.
    unit_in_head = torch.where(dim < half, dim, dim - half)
    units_per_head = head_dim - half
    return (torch.arange(num_heads).repeat_interleave(head_dim) * units_per_head) + unit_in_head.repeat(num_heads)


def select_channels(
    scores: torch.Tensor,
    top_ratio: float,
    mode: SelectionMode = "high",
    *,
    units: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Select channels of one projection.

    Args:
        scores: ``[channels]`` saliency per channel (higher = more salient).
        top_ratio: fraction of units to select.
        mode: ``high`` (LongAct: most salient), ``low`` (least salient), ``random`` (same count, uniformly; needs
            ``generator`` for reproducibility) or ``none`` (select everything: uniform updates).
        units: ``[channels]`` unit id of each channel from :func:`channel_units`; ``None`` = one unit per channel.
            A unit's score is the mean of its channels' scores.
        generator: random source for ``mode="random"``.

    Returns:
        ``[channels]`` bool, True = selected (trainable).
    """
    channels = scores.shape[0]
    if mode == "none":
        return torch.ones(channels, dtype=torch.bool)
    units = torch.arange(channels) if units is None else units
    num_units = int(units.max()) + 1
    unit_scores = torch.zeros(num_units, dtype=torch.float64).index_add_(0, units, scores.double().cpu())
    unit_scores /= torch.bincount(units, minlength=num_units).double()  # [U]
    k = num_selected(num_units, top_ratio)
    if mode == "random":
        order = torch.randperm(num_units, generator=generator)
    else:
        # A stable sort makes ties resolve by index, identically on every rank.
        order = torch.sort(unit_scores, descending=(mode == "high"), stable=True).indices
    chosen = torch.zeros(num_units, dtype=torch.bool)
    chosen[order[:k]] = True
    return chosen[units]  # [channels]


def row_masks(
    projections: Sequence[QKProjection], channel_masks: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Per-parameter row masks (True = trainable) from per-projection channel selections.

    Rows of a parameter that belong to no query/key projection (e.g. the value rows of a fused ``qkv_proj``) stay
    trainable. Biases get the same mask as their weight: a channel's bias entry belongs to the channel.

    Args:
        projections: from :func:`find_qk_projections`.
        channel_masks: ``{projection.key: [channels] bool}``.

    Returns:
        ``{parameter name: [rows] bool}`` for every weight (and bias) that has at least one frozen row.
    """
    masks: dict[str, torch.Tensor] = {}
    for proj in projections:
        mask = masks.setdefault(proj.weight_name, torch.ones(proj.weight_rows, dtype=torch.bool))
        mask[proj.rows] = channel_masks[proj.key]
    for proj in projections:
        if proj.bias_name is not None:
            masks[proj.bias_name] = masks[proj.weight_name]
    return {name: mask for name, mask in masks.items() if not bool(mask.all())}


def jaccard(a: torch.Tensor, b: torch.Tensor) -> float:
    """``|a & b| / |a | b|`` of two bool masks (1.0 when both are empty)."""
    union = int((a | b).sum())
    return 1.0 if union == 0 else int((a & b).sum()) / union
