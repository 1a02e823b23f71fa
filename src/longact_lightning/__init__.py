"""LongAct, saliency-guided sparse updates for long-context RL, as PyTorch Lightning callbacks and modules.

The three callbacks work in any Lightning project that trains a transformers model; ``RLPolicyModule`` and
``RolloutDataModule`` are the RL trainer (GRPO, DAPO, ...) they were built for.
"""

from importlib.metadata import version

from longact_lightning.callbacks import ActivationSaliency, GradientRowMask, HostMemoryReuse, LongAct
from longact_lightning.data.datamodule import RolloutDataModule
from longact_lightning.rl.module import RLPolicyModule

__version__ = version("longact-lightning")

__all__ = [
    "ActivationSaliency",
    "GradientRowMask",
    "HostMemoryReuse",
    "LongAct",
    "RLPolicyModule",
    "RolloutDataModule",
    "__version__",
]
