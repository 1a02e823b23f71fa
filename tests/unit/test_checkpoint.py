"""RankSafeCheckpoint's own argument (its multi-rank behaviour: tests/integration/test_cli_distributed.py)."""

from __future__ import annotations

import pytest

from longact_lightning.callbacks import RankSafeCheckpoint


def test_checkpoint_agreement_needs_a_positive_wait():
    with pytest.raises(ValueError, match="agree_seconds=0 must be > 0"):
        RankSafeCheckpoint(agree_seconds=0)
