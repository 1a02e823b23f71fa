"""A rich table at the end of fit: what a person wants to see after a run."""

from __future__ import annotations

import time
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only
from typing_extensions import override

from longact_lightning.callbacks.activation_saliency import ActivationSaliency


class RunSummary(Callback):
    """Collects a few per-step metrics and prints steps, reward start -> end, accuracy, sparsity, tokens/s, time.

    Args:
        window: steps averaged for the "start" and "end" values (single steps of RL reward are noisy).
    """

    TRACKED = ("train/reward_mean", "train/accuracy", "train/tokens_per_s")

    def __init__(self, window: int = 3) -> None:
        if window < 1:
            raise ValueError(f"window={window} must be >= 1.")
        self.window = window
        self.history: dict[str, list[float]] = {name: [] for name in self.TRACKED}
        self._start = 0.0
        self._first_step = 0

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.perf_counter()

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._first_step = trainer.global_step  # after a resume's loop state is restored, unlike at fit start

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        for name in self.TRACKED:
            value = trainer.callback_metrics.get(name)
            if value is not None:
                self.history[name].append(float(value.item() if isinstance(value, torch.Tensor) else value))

    @override
    @rank_zero_only
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from rich.console import Console
        from rich.table import Table

        table = Table(title="longact run summary", show_header=True, header_style="bold")
        table.add_column("metric")
        table.add_column("value", justify="right")
        table.add_row("optimizer steps", f"{self._first_step} -> {trainer.global_step}")
        table.add_row("reward (mean of first -> last steps)", self._start_end("train/reward_mean"))
        table.add_row("accuracy", self._start_end("train/accuracy"))
        table.add_row("Q/K rows trainable", _trainable_rows(trainer))
        tps = self.history["train/tokens_per_s"]
        table.add_row("train tokens/s (median)", f"{sorted(tps)[len(tps) // 2]:.0f}" if tps else "-")
        table.add_row("wall time", f"{time.perf_counter() - self._start:.0f} s")
        Console().print(table)

    def _start_end(self, name: str) -> str:
        values = self.history[name]
        if not values:
            return "-"
        first = values[: self.window]
        last = values[-self.window :]
        return f"{sum(first) / len(first):.3f} -> {sum(last) / len(last):.3f}"


def _trainable_rows(trainer: pl.Trainer) -> str:
    """The share of query/key channels the run's selection keeps trainable, read from the callback's masks (so a
    resumed run, which selects nothing, reports the masks it restored)."""
    # Trainer.callbacks is assigned by Lightning's CallbackConnector and never declared on Trainer
    callbacks: list[Callback] = trainer.callbacks  # type: ignore[attr-defined]
    saliency = next((cb for cb in callbacks if isinstance(cb, ActivationSaliency)), None)
    if saliency is None:
        return "all (no LongAct callback)"
    masks = list(saliency.channel_masks.values())
    if not masks:
        return "none selected yet"
    kept = sum(int(mask.sum()) for mask in masks) / sum(mask.numel() for mask in masks)
    return f"{100 * kept:.1f} % (mode {saliency.mode})"
