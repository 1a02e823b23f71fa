"""Gradient row masks that really freeze rows.

Zeroing a frozen row's gradient is not enough to keep it still: AdamW's decoupled weight decay shrinks every
parameter it owns, and momentum accumulated before a mask refresh keeps moving a row after it was frozen. So this
callback (1) zeroes frozen gradient rows in ``on_before_optimizer_step`` — Lightning calls it after AMP unscaling
and gradient accumulation, before gradient clipping, so the clip norm is that of the masked gradient — and (2) keeps a
copy of the frozen rows, taken when they were frozen, and writes it back from an ``optimizer.step()`` post-hook, which
makes them bit-identical whatever the optimizer, its weight decay, momentum or the precision. (Frozen rows are pinned
to their values at freezing time; the copy is taken once per mask change, not per step.) When a refresh freezes a row
that was trainable, its optimizer moments are cleared so stale momentum cannot resume if it is selected again.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from longact_lightning.callbacks.local_rows import FlatShard, LocalRows, fsdp1_flat_shards, global_rows, local_rows
from longact_lightning.saliency.projections import clean_name


class GradientRowMask(Callback):
    """Keep the unselected rows of chosen parameters exactly where they are.

    Args:
        masks: ``{parameter name: [rows] bool}`` (True = trainable), names as in the LightningModule's
            ``named_parameters()`` (FSDP1 wrapper segments removed); rows are those of the full parameter whatever
            the strategy's storage (see :mod:`longact_lightning.callbacks.local_rows`). May be set later with
            :meth:`set_masks` (``ActivationSaliency`` does).

    Example::

        trainer = Trainer(callbacks=[GradientRowMask({"model.layers.0.self_attn.q_proj.weight": row_mask})])
    """

    def __init__(self, masks: Mapping[str, torch.Tensor] | None = None) -> None:
        self._masks: dict[str, torch.Tensor] = {}
        self._params: dict[str, torch.nn.Parameter] = {}
        self._flat_shards: dict[int, FlatShard] = {}  # FSDP1 only: where each rank's 1-D view sits
        self._frozen: dict[str, LocalRows] = {}
        self._optimizers: list[torch.optim.Optimizer] = []
        self._handles: list[RemovableHandle] = []
        self._pinned: dict[str, torch.Tensor] = {}  # frozen rows' local values at freezing time
        if masks:
            self.set_masks(masks)

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """``{parameter name: [rows] bool}`` currently enforced (True = trainable)."""
        return dict(self._masks)

    def set_masks(self, masks: Mapping[str, torch.Tensor]) -> None:
        """Replace the masks; rows frozen by this call lose their optimizer moments."""
        new = {name: _as_row_mask(name, mask) for name, mask in masks.items()}
        newly_frozen = {
            name: ~mask & self._masks.get(name, torch.ones_like(mask)) for name, mask in new.items() if self._params
        }
        self._masks = new
        if self._params:
            self._resolve()
            self._clear_optimizer_state(newly_frozen)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        from lightning.pytorch.strategies import DeepSpeedStrategy

        if isinstance(trainer.strategy, DeepSpeedStrategy):
            raise RuntimeError(
                "GradientRowMask / LongAct cannot guarantee frozen rows under DeepSpeed: its optimizer updates fp32 "
                "master weights and partitioned gradients outside Lightning's hooks. Use strategy='ddp', 'fsdp' or "
                "ModelParallelStrategy (FSDP2) instead."
            )

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._params = {clean_name(name): param for name, param in pl_module.named_parameters()}
        # FSDP1 wraps the LightningModule itself, so its outermost unit is only reachable through the strategy.
        self._flat_shards = fsdp1_flat_shards(getattr(getattr(trainer, "strategy", None), "model", None) or pl_module)
        self._resolve()
        self._optimizers = list(trainer.optimizers)
        for optimizer in self._optimizers:
            self._handles.append(optimizer.register_step_post_hook(self._restore))

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        with torch.no_grad():
            for name, rows in self._frozen.items():
                grad = rows.local_grad(self._params[name])
                if grad is not None:
                    grad.index_fill_(0, rows.index, 0)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._pinned.clear()

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"masks": {name: mask.clone() for name, mask in self._masks.items()}}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.set_masks(state_dict.get("masks", {}))

    def _resolve(self) -> None:
        missing = sorted(set(self._masks) - set(self._params))
        if missing:
            raise KeyError(
                f"GradientRowMask has masks for parameters the module does not have: {missing[:5]}; "
                "mask keys must be names from LightningModule.named_parameters()."
            )
        frozen = {}
        for name, mask in self._masks.items():
            param = self._params[name]
            flat_shard = self._flat_shards.get(id(param))
            rows_total = global_rows(param, flat_shard)  # FSDP1 shows a 1-D shard: compare with the full shape
            if mask.shape[0] != rows_total:
                raise ValueError(
                    f"Mask for {name!r} has {mask.shape[0]} rows but the parameter has {rows_total}; "
                    "masks must cover dimension 0 (output rows) exactly."
                )
            rows = local_rows(param, ~mask, flat_shard)
            if rows.index.numel():
                frozen[name] = rows
        self._frozen = frozen
        with torch.no_grad():
            self._pinned = {
                name: rows.local_data(self._params[name]).index_select(0, rows.index) for name, rows in frozen.items()
            }

    def _restore(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        with torch.no_grad():
            for name, pinned in self._pinned.items():
                rows = self._frozen[name]
                rows.local_data(self._params[name]).index_copy_(0, rows.index, pinned)

    def _clear_optimizer_state(self, newly_frozen: Mapping[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, frozen_now in newly_frozen.items():
                if not bool(frozen_now.any()):
                    continue
                param = self._params[name]
                rows = local_rows(param, frozen_now, self._flat_shards.get(id(param)))
                for optimizer in self._optimizers:
                    for value in optimizer.state.get(param, {}).values():
                        if isinstance(value, torch.Tensor) and value.shape == param.shape:
                            rows.local_data(value).index_fill_(0, rows.index, 0)


def _as_row_mask(name: str, mask: torch.Tensor) -> torch.Tensor:
    mask = torch.as_tensor(mask)
    if mask.dim() != 1 or mask.dtype != torch.bool:
        raise ValueError(
            f"Mask for {name!r} must be a 1-D bool tensor over rows, got {mask.dtype} {tuple(mask.shape)}."
        )
    return mask.cpu()
