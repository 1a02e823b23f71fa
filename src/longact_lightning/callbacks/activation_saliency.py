"""Measure query/key channel saliency with forward hooks and turn it into row masks.

Statistics come from calibration batches given to the callback (one no-grad pass at fit start, like the paper's
profiling pass) and/or from the live training forward passes of the first ``collect_steps`` optimizer steps;
optionally they are refreshed every ``refresh_every_n_steps`` steps and blended with an EMA. The selection is made in
``on_before_optimizer_step`` of the last collection step, i.e. before that step's update, so the masks govern every
update from then on. Until the first selection every query/key row is frozen: a row that moved during collection
might be one the selection then freezes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from longact_lightning.callbacks.gradient_row_mask import GradientRowMask
from longact_lightning.saliency.masks import (
    Granularity,
    SelectionMode,
    channel_units,
    jaccard,
    row_masks,
    select_channels,
    validate_selection,
)
from longact_lightning.saliency.projections import QKProjection, clean_name, find_qk_projections
from longact_lightning.saliency.real_tokens import declared_real_tokens, is_padding_only
from longact_lightning.saliency.stats import STATISTICS, ChannelStats, Statistic


class ActivationSaliency(Callback):
    """Collect per-channel |activation| statistics of every query/key projection and select rows to update.

    Args:
        top_ratio: fraction of each projection's channels (or heads / RoPE pairs) to keep trainable; paper: 0.3.
        mode: ``high`` (LongAct), ``low``, ``random`` (same count, seeded: the control) or ``none`` (uniform).
        granularity: ``channel``, ``head`` or ``rope_pair`` (keep RoPE channel pairs together).
        statistic: ``mean_abs`` (default), ``rms`` or ``max_abs`` over real tokens.
        calibration_data: batches (dicts with ``input_ids`` and optionally ``attention_mask``) for a no-grad
            profiling pass at fit start.
        collect_steps: optimizer steps of live training forwards to collect before selecting (0 with calibration
            data = select from calibration alone).
        refresh_every_n_steps: re-collect over one step and re-select every this many steps (``None`` = never).
        ema: weight of the previous scores when refreshing (0 = replace).
        seed: seed of ``mode="random"``.
        patterns: ``{"q": regex, "k": regex}`` overriding projection discovery.
        model_attr: attribute of the LightningModule holding the HF model, when it has several trainable ones.
        row_mask: the :class:`GradientRowMask` that enforces the selection; ``None`` = only measure and log.
    """

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
        row_mask: GradientRowMask | None = None,
    ) -> None:
        validate_selection(top_ratio, mode, granularity)
        if statistic not in STATISTICS:
            raise ValueError(f"statistic={statistic!r} is not one of {STATISTICS}.")
        if collect_steps < 0 or (collect_steps == 0 and calibration_data is None):
            raise ValueError(
                f"collect_steps={collect_steps}: give calibration_data, or collect_steps >= 1 to measure saliency "
                "on the training forward passes."
            )
        if refresh_every_n_steps is not None and refresh_every_n_steps < 1:
            raise ValueError(f"refresh_every_n_steps={refresh_every_n_steps} must be >= 1 or None.")
        if not 0.0 <= ema < 1.0:
            raise ValueError(f"ema={ema} must be in [0, 1).")
        self.top_ratio, self.mode, self.granularity, self.statistic = top_ratio, mode, granularity, statistic
        self.calibration_data = calibration_data
        self.collect_steps, self.refresh_every_n_steps = collect_steps, refresh_every_n_steps
        self.ema, self.seed = ema, seed
        self.patterns, self.model_attr, self.row_mask = patterns, model_attr, row_mask

        self.projections: list[QKProjection] = []
        self.stats: dict[str, ChannelStats] = {}
        self.scores: dict[str, torch.Tensor] = {}
        self.channel_masks: dict[str, torch.Tensor] = {}
        self.selections = 0
        self._restored_selection: dict[str, Any] | None = None
        self._prefix = ""
        self._model: nn.Module | None = None
        self._collecting = False
        self._token_mask: torch.Tensor | None = None
        self._forward_id = 0
        self._counted: dict[str, int] = {}
        self._handles: list[RemovableHandle] = []
        self._pending_metrics: dict[str, float] = {}
        self._device: torch.device | None = None  # where the statistics are all-reduced
        self._state_at_step_start: dict[str, Any] | None = None  # what a checkpoint taken mid-step holds

    # ------------------------------------------------------------------ Lightning hooks

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        # Trainer.callbacks is assigned by Lightning's CallbackConnector and never declared on Trainer
        callbacks: list[Callback] = trainer.callbacks  # type: ignore[attr-defined]
        mask = self.row_mask
        if mask is None or mask not in callbacks or self not in callbacks:
            return
        if callbacks.index(mask) < callbacks.index(self):
            raise ValueError(
                "ActivationSaliency must come before its GradientRowMask in Trainer(callbacks=[...]) so the "
                "selection is made before the masks are applied; or use LongAct, which orders them itself."
            )

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Not in setup: a module may build its model in configure_model, which runs after the callbacks' setup.
        self._attach(pl_module)
        self._device = trainer.strategy.root_device  # not torch.cuda.current_device(): a colocated vLLM may move it
        if self.channel_masks:  # restored from a checkpoint
            current = self._selection_settings()
            changed = {k: (old, current[k]) for k, old in (self._restored_selection or {}).items() if old != current[k]}
            if changed:  # applied, not silently mixed: the masks are selected again from the restored statistics
                rank_zero_warn(
                    "Resuming with other selection settings than the checkpoint's ("
                    + ", ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in changed.items())
                    + "): the masks are selected again from the checkpoint's statistics with the new settings."
                )
                self._select()
            else:
                self._push_masks()
            return
        if self.calibration_data is not None:
            self._calibrate(pl_module, self.calibration_data)
            if self.collect_steps == 0:
                self._select()
                return
        self._push_masks()  # nothing selected yet: every query/key row stays frozen while collecting

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # A step can be abandoned (SIGTERM, Ctrl-C) after its passes have added to the statistics; a checkpoint then
        # holds the state the step started from, which a resumed run measures the step again from.
        self._state_at_step_start = self._state(copy=True)
        step = trainer.global_step
        if not self._collecting and self._is_collection_step(step) and step >= self.collect_steps:
            self._reset_stats()  # a refresh window measures the current policy; the EMA lives in the scores
        self._collecting = self._is_collection_step(step)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        step = trainer.global_step
        if self._collecting and self._is_selection_step(step):
            self._select()
            self._collecting = self._is_collection_step(step + 1)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        for name, value in self._pending_metrics.items():
            pl_module.log(name, value, on_step=True, on_epoch=False, rank_zero_only=True, batch_size=1)
        self._pending_metrics = {}
        self._state_at_step_start = None

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._collecting = False

    @override
    def state_dict(self) -> dict[str, Any]:
        """Statistics, scores and masks after the last completed step (during a step: from before it)."""
        return self._state_at_step_start or self._state(copy=False)

    def _state(self, copy: bool) -> dict[str, Any]:
        stats = {key: stats.state_dict() for key, stats in self.stats.items()}
        if copy:
            stats = {key: {name: t.clone() for name, t in state.items()} for key, state in stats.items()}
        return {
            "stats": stats,
            "scores": {key: score.clone() for key, score in self.scores.items()},
            "channel_masks": {key: mask.clone() for key, mask in self.channel_masks.items()},
            "selections": self.selections,
            "selection": self._selection_settings(),
        }

    def _selection_settings(self) -> dict[str, Any]:
        return {
            "top_ratio": self.top_ratio, "mode": self.mode, "granularity": self.granularity,
            "statistic": self.statistic,
        }  # fmt: skip

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for key, stats_state in state_dict.get("stats", {}).items():
            stats = ChannelStats(stats_state["sum_abs"].numel())
            stats.load_state_dict(stats_state)
            self.stats[key] = stats
        self.scores = {key: score.clone() for key, score in state_dict.get("scores", {}).items()}
        self.channel_masks = {key: mask.clone() for key, mask in state_dict.get("channel_masks", {}).items()}
        self.selections = state_dict.get("selections", 0)
        self._restored_selection = state_dict.get("selection")

    # ------------------------------------------------------------------ schedule

    def _is_collection_step(self, step: int) -> bool:
        if step < self.collect_steps:
            return True
        every = self.refresh_every_n_steps
        return every is not None and step >= self.collect_steps and (step - self.collect_steps + 1) % every == 0

    def _is_selection_step(self, step: int) -> bool:
        return step == self.collect_steps - 1 or (step >= self.collect_steps and self._is_collection_step(step))

    # ------------------------------------------------------------------ hooks on the model

    def _attach(self, pl_module: pl.LightningModule) -> None:
        """Find the model's query/key projections and hook them (once per fit)."""
        model, self._prefix = _find_hf_model(pl_module, self.model_attr)
        self._model = model
        self.projections = find_qk_projections(model, self.patterns)
        by_module: dict[str, list[QKProjection]] = {}
        for proj in self.projections:
            by_module.setdefault(proj.module_name, []).append(proj)
            self.stats.setdefault(self._key(proj), ChannelStats(proj.channels))
        modules = {clean_name(name): module for name, module in model.named_modules()}
        self._handles.append(model.register_forward_pre_hook(self._capture_token_mask, with_kwargs=True))
        for module_name, projs in by_module.items():
            self._handles.append(modules[module_name].register_forward_hook(self._make_hook(module_name, projs)))

    def _capture_token_mask(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Remember which tokens are real for this forward (declared, else the 2D attention mask); the projection
        hooks read it."""
        mask = declared_real_tokens()
        if mask is None:
            mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        self._token_mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        self._forward_id += 1

    def _make_hook(self, module_name: str, projs: list[QKProjection]):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            # Gradient checkpointing re-runs the layer in backward; count each forward's tokens once.
            if not self._collecting or self._counted.get(module_name) == self._forward_id or is_padding_only():
                return
            self._counted[module_name] = self._forward_id
            mask = _current_token_mask(self._token_mask, output.shape[:-1])
            with torch.no_grad():  # nothing here may enter the autograd graph (checkpoint recompute compares it)
                for proj in projs:
                    rows = proj.rows.to(output.device)
                    self.stats[self._key(proj)].update(output.detach().index_select(-1, rows), mask)

        return hook

    # ------------------------------------------------------------------ selection

    @torch.no_grad()
    def _calibrate(self, pl_module: pl.LightningModule, data: Iterable[Mapping[str, torch.Tensor]]) -> None:
        model = self._model
        assert model is not None  # _attach ran first
        was_training = model.training
        model.eval()
        self._collecting = True
        try:
            for batch in data:
                inputs = {k: v.to(pl_module.device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}
                model(**inputs)
        finally:
            self._collecting = False
            model.train(was_training)

    def _select(self) -> None:
        previous = dict(self.channel_masks)
        for i, proj in enumerate(self.projections):
            key = self._key(proj)
            stats = self.stats[key]
            stats.all_reduce(self._device)  # every rank selects from the same statistics, hence the same rows
            fresh = stats.value(self.statistic)
            old = self.scores.get(key)
            self.scores[key] = fresh if old is None or self.ema == 0 else self.ema * old + (1 - self.ema) * fresh
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.selections * 10_007 + i)
            units = channel_units(proj.num_heads, proj.head_dim, proj.rotary_dim, self.granularity)
            self.channel_masks[key] = select_channels(
                self.scores[key], self.top_ratio, self.mode, units=units, generator=generator
            )
        self.selections += 1
        self._push_masks()
        self._pending_metrics = self._selection_metrics(previous)

    def _push_masks(self) -> None:
        if self.row_mask is None:
            return
        channel_masks = {
            # Before the first selection every query/key row is frozen.
            p.key: self.channel_masks.get(self._key(p), torch.zeros(p.channels, dtype=torch.bool))
            for p in self.projections
        }
        masks = row_masks(self.projections, channel_masks)
        self.row_mask.set_masks({self._prefix + name: mask for name, mask in masks.items()})

    def _reset_stats(self) -> None:
        self.stats = {self._key(p): ChannelStats(p.channels) for p in self.projections}

    def _selection_metrics(self, previous: Mapping[str, torch.Tensor]) -> dict[str, float]:
        """Sparsity, each projection's share of magnitude in the selected channels, overlap with the last mask."""
        selected = sum(int(m.sum()) for m in self.channel_masks.values())
        total = sum(m.numel() for m in self.channel_masks.values())
        metrics = {"longact/selected_fraction": selected / total}
        shares = []
        for proj in self.projections:
            key = self._key(proj)
            score, mask = self.scores[key], self.channel_masks[key]
            share = float(score[mask].sum() / score.sum().clamp_min(1e-30))
            shares.append(share)
            metrics[f"longact/top_share/layer{proj.layer}_{proj.kind}"] = share
        metrics["longact/top_share_mean"] = sum(shares) / len(shares)
        if previous:
            overlaps = [jaccard(previous[k], m) for k, m in self.channel_masks.items() if k in previous]
            metrics["longact/mask_jaccard_prev"] = sum(overlaps) / len(overlaps)
        return metrics

    def _key(self, proj: QKProjection) -> str:
        """State keys are parameter names: ``<weight name>:q`` / ``<weight name>:k``."""
        return self._prefix + proj.key


def _find_hf_model(pl_module: pl.LightningModule, model_attr: str | None) -> tuple[nn.Module, str]:
    """The trainable HF model inside ``pl_module`` and its name prefix (``"policy."``, or ``""`` for the module)."""
    from transformers import PreTrainedModel

    if model_attr is not None:
        model = getattr(pl_module, model_attr, None)
        if not isinstance(model, nn.Module):
            raise AttributeError(
                f"model_attr={model_attr!r}: the LightningModule has no nn.Module attribute by that name."
            )
        return model, f"{model_attr}."
    candidates = [
        (clean_name(name), module)
        for name, module in pl_module.named_modules()
        if isinstance(module, PreTrainedModel) and any(p.requires_grad for p in module.parameters())
    ]
    outermost = [(n, m) for n, m in candidates if not any(n.startswith(f"{o}.") for o, _ in candidates if o != n)]
    if len(outermost) != 1:
        found = [n or "<the module itself>" for n, _ in outermost]
        raise ValueError(
            f"Expected one trainable HF PreTrainedModel in {type(pl_module).__name__}, found {found or 'none'}; "
            "pass model_attr='<attribute name>' to choose."
        )
    name, model = outermost[0]
    return model, f"{name}." if name else ""


def _current_token_mask(attention_mask: torch.Tensor | None, shape: torch.Size) -> torch.Tensor | None:
    """The ``[B, T]`` real-token mask of a forward's ``T`` new tokens, or ``None`` when it cannot be known.

    With a KV cache HF's ``attention_mask`` covers the cached tokens followed by the new ones, so the new tokens'
    mask is its last ``T`` columns (right-padded completions scored after a shared prompt, for one).
    """
    if attention_mask is None or attention_mask.shape[0] != shape[0] or attention_mask.shape[1] < shape[1]:
        return None
    return attention_mask[:, attention_mask.shape[1] - shape[1] :]
