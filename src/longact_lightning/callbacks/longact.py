"""The one-line drop-in: ``Trainer(callbacks=[LongAct()])``."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from typing_extensions import override

from longact_lightning.callbacks.activation_saliency import ActivationSaliency
from longact_lightning.callbacks.gradient_row_mask import GradientRowMask
from longact_lightning.saliency.masks import Granularity, SelectionMode
from longact_lightning.saliency.stats import Statistic


class LongAct(ActivationSaliency):
    """Saliency-guided sparse query/key updates for any LightningModule whose model is a HF causal LM.

    Measures per-channel activation magnitude of every query/key projection, keeps the top ``top_ratio`` rows of each
    ``W_Q`` / ``W_K`` trainable and freezes the rest exactly; every other parameter trains normally. It is
    :class:`ActivationSaliency` driving its own :class:`GradientRowMask`, with the hooks called in the order that
    makes the selection precede the masking. See :class:`ActivationSaliency` for the arguments.

    Example::

        trainer = Trainer(callbacks=[LongAct(top_ratio=0.3)])
    """

    row_mask: GradientRowMask  # its own, built in __init__: never None, unlike ActivationSaliency's

    def __init__(
        self,
        top_ratio: float = 0.3,
        mode: SelectionMode = "high",
        granularity: Granularity = "channel",
        statistic: Statistic = "mean_abs",
        calibration_data: Iterable[Mapping[str, torch.Tensor]] | None = None,
        collect_steps: int = 1,
        refresh_every_n_steps: int | None = None,
        ema: float = 0.0,
        seed: int = 0,
        patterns: Mapping[str, str] | None = None,
        model_attr: str | None = None,
    ) -> None:
        super().__init__(
            top_ratio=top_ratio,
            mode=mode,
            granularity=granularity,
            statistic=statistic,
            calibration_data=calibration_data,
            collect_steps=collect_steps,
            refresh_every_n_steps=refresh_every_n_steps,
            ema=ema,
            seed=seed,
            patterns=patterns,
            model_attr=model_attr,
            row_mask=GradientRowMask(),
        )

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self.row_mask.setup(trainer, pl_module, stage)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.row_mask.on_fit_start(trainer, pl_module)
        super().on_fit_start(trainer, pl_module)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        super().on_before_optimizer_step(trainer, pl_module, optimizer)
        self.row_mask.on_before_optimizer_step(trainer, pl_module, optimizer)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        self.row_mask.teardown(trainer, pl_module, stage)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "row_mask": self.row_mask.state_dict()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.row_mask.load_state_dict(state_dict.get("row_mask", {}))
