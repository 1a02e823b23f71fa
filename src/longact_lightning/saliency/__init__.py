"""Where the query/key channels are, how salient they are, and which rows to update."""

from longact_lightning.saliency.masks import (
    channel_units,
    jaccard,
    num_selected,
    row_masks,
    select_channels,
    validate_selection,
)
from longact_lightning.saliency.projections import QKProjection, clean_name, find_qk_projections
from longact_lightning.saliency.stats import ChannelStats

__all__ = [
    "ChannelStats",
    "QKProjection",
    "channel_units",
    "clean_name",
    "find_qk_projections",
    "jaccard",
    "num_selected",
    "row_masks",
    "select_channels",
    "validate_selection",
]
