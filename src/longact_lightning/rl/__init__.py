"""The RL side: losses and advantages (pure functions), log-prob scoring, micro-batch planning, and the module."""

from longact_lightning.rl.losses import LossConfig
from longact_lightning.rl.module import RLPolicyModule

__all__ = ["LossConfig", "RLPolicyModule"]
