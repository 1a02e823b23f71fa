"""The public API: what the README imports from the package's top level."""

from __future__ import annotations

from importlib.metadata import version

import longact_lightning
from longact_lightning.callbacks import ActivationSaliency, GradientRowMask, LongAct
from longact_lightning.data.datamodule import RolloutDataModule
from longact_lightning.rl.module import RLPolicyModule


def test_top_level_exports_the_public_classes_and_the_version():
    from longact_lightning import ActivationSaliency as A  # noqa: N817
    from longact_lightning import GradientRowMask as G
    from longact_lightning import LongAct as L
    from longact_lightning import RLPolicyModule as M  # noqa: N817
    from longact_lightning import RolloutDataModule as D

    assert (ActivationSaliency, GradientRowMask, LongAct, RLPolicyModule, RolloutDataModule) == (A, G, L, M, D)
    assert longact_lightning.__version__ == version("longact-lightning")
    assert all(hasattr(longact_lightning, name) for name in longact_lightning.__all__)
