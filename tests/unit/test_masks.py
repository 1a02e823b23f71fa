"""Row selection: counts, modes, granularities, RoPE pairs, row masks of fused layouts, Jaccard."""

from __future__ import annotations

import pytest
import torch

from longact_lightning.saliency import (
    channel_units,
    find_qk_projections,
    jaccard,
    num_selected,
    row_masks,
    select_channels,
)
from longact_lightning.saliency.masks import validate_selection
from tests.helpers.models import tiny_model


@pytest.mark.parametrize(
    ("units", "ratio", "expected"), [(64, 0.3, 19), (32, 0.3, 10), (10, 0.25, 3), (10, 0.05, 1), (7, 1.0, 7)]
)
def test_num_selected_rounds_half_up(units, ratio, expected):
    assert num_selected(units, ratio) == expected


def test_high_low_pick_extremes_and_random_is_seeded_same_count():
    scores = torch.tensor([5.0, 1.0, 9.0, 3.0, 7.0, 0.5, 2.0, 8.0, 4.0, 6.0])
    high = select_channels(scores, 0.3, "high")
    low = select_channels(scores, 0.3, "low")
    assert high.nonzero().flatten().tolist() == [2, 4, 7]
    assert low.nonzero().flatten().tolist() == [1, 5, 6]
    r1 = select_channels(scores, 0.3, "random", generator=torch.Generator().manual_seed(3))
    r2 = select_channels(scores, 0.3, "random", generator=torch.Generator().manual_seed(3))
    r3 = select_channels(scores, 0.3, "random", generator=torch.Generator().manual_seed(4))
    assert torch.equal(r1, r2) and int(r1.sum()) == 3 and int(r3.sum()) == 3
    assert select_channels(scores, 0.3, "none").all()


def test_head_granularity_selects_whole_heads_by_mean_score():
    scores = torch.tensor([1.0, 1.0, 9.0, 9.0, 2.0, 2.0, 5.0, 5.0])  # 4 heads x head_dim 2
    mask = select_channels(scores, 0.5, "high", units=channel_units(4, 2, 2, "head"))
    assert mask.tolist() == [False, False, True, True, False, False, True, True]


def test_rope_pairs_are_kept_together():
    head_dim, heads = 8, 2  # pairs (0,4) (1,5) (2,6) (3,7) in each head
    units = channel_units(heads, head_dim, head_dim, "rope_pair")
    assert units.tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 6, 7, 4, 5, 6, 7]
    scores = torch.zeros(16)
    scores[1] = 10.0  # channel 1 alone is salient; its partner 5 must come with it
    mask = select_channels(scores, 0.125, "high", units=units)
    assert mask.nonzero().flatten().tolist() == [1, 5]


def test_partial_rotary_leaves_unrotated_channels_single():
    units = channel_units(1, 6, 4, "rope_pair")  # rotary dims 0..3 pair (0,2) (1,3); dims 4, 5 alone
    assert units.tolist() == [0, 1, 0, 1, 2, 3]


@pytest.mark.parametrize("arch", ["phi3", "gpt_neox"])
def test_row_masks_of_fused_layouts_leave_value_rows_trainable(arch):
    model = tiny_model(arch)
    projections = find_qk_projections(model)
    channel_masks = {p.key: torch.zeros(p.channels, dtype=torch.bool) for p in projections}
    masks = row_masks(projections, channel_masks)
    for p in projections:
        mask = masks[p.weight_name]
        assert not mask[p.rows].any()
    per_weight = masks[projections[0].weight_name]
    qk_rows = sum(p.channels for p in projections if p.layer == 0)
    assert int(per_weight.sum()) == per_weight.numel() - qk_rows  # the value rows stay trainable
    if arch == "gpt_neox":
        assert torch.equal(masks[projections[0].bias_name], per_weight)


def test_row_masks_omit_parameters_with_nothing_frozen():
    model = tiny_model("llama_gqa")
    projections = find_qk_projections(model)
    channel_masks = {p.key: torch.ones(p.channels, dtype=torch.bool) for p in projections}
    assert row_masks(projections, channel_masks) == {}


def test_jaccard():
    a = torch.tensor([True, True, False, False])
    b = torch.tensor([True, False, True, False])
    assert jaccard(a, b) == pytest.approx(1 / 3)
    assert jaccard(torch.zeros(3, dtype=torch.bool), torch.zeros(3, dtype=torch.bool)) == 1.0


@pytest.mark.parametrize(
    ("ratio", "mode", "gran", "match"),
    [
        (0.0, "high", "channel", "top_ratio=0.0"),
        (0.3, "top", "channel", "mode='top'"),
        (0.3, "high", "row", "granularity='row'"),
    ],
)
def test_validation_names_the_bad_value(ratio, mode, gran, match):
    with pytest.raises(ValueError, match=match):
        validate_selection(ratio, mode, gran)
