"""A quiet CPU Trainer for tests: no logger, checkpoints, progress bar or model summary unless a test asks."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl

QUIET: dict[str, Any] = {
    "logger": False, "enable_checkpointing": False, "enable_progress_bar": False, "enable_model_summary": False
}  # fmt: skip


def cpu_trainer(steps: int, callbacks: list[Any], **kwargs: Any) -> pl.Trainer:
    """``steps`` optimizer steps on one CPU device; ``kwargs`` override any default (``devices``, ``strategy``...)."""
    defaults = {"max_steps": steps, "accelerator": "cpu", "devices": 1, "callbacks": callbacks, **QUIET}
    return pl.Trainer(**{**defaults, **kwargs})
