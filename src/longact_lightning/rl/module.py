"""The RL LightningModule: one rollout batch in, ``ppo_epochs`` optimizer steps out.

The module owns the policy (``self.policy``, a ``transformers.PreTrainedModel``: the LongAct callbacks find it there),
an optional frozen reference model, the loss and the optimizer. Rollouts come from the DataModule, which generates
them lazily with the current weights; the module therefore asks for its batch itself
(``training_step(dataloader_iter)``) so Lightning does not prefetch — and generate — the next batch before this step's
update has happened.

Validation and test batches are held-out records the DataModule has already completed greedily (with the engine, after
a weight push) and scored; the module only aggregates them into ``torchmetrics`` means per task, synchronised across
ranks, and logs ``val/<task>/score`` (``test/...``) in percent.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Iterator, Mapping
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import FSDPStrategy, ParallelStrategy
from lightning.pytorch.utilities import rank_zero_warn
from torchmetrics.aggregation import MeanMetric
from typing_extensions import override

from longact_lightning.models import EMBEDDED_MODEL, load_causal_lm, load_tokenizer
from longact_lightning.rl.advantages import StdScaling, group_advantages
from longact_lightning.rl.logprobs import (
    completion_logprobs,
    grouped_completion_logprobs,
    sequence_parallel_completion_logprobs,
)
from longact_lightning.rl.losses import LossConfig, policy_loss, step_denominator
from longact_lightning.rl.micro_batches import balanced_partition, group_costs, plan_micro_batches
from longact_lightning.rl.precision import autocast_weights_once
from longact_lightning.rollout.batch import RolloutBatch
from longact_lightning.rollout.weight_sync import full_named_parameters
from longact_lightning.saliency.real_tokens import padding_only
from longact_lightning.sequence_parallel import sequence_parallel_group, ulysses
from longact_lightning.sharding import (
    clip_grad_norm,
    data_parallel_mesh,
    fsdp1_root,
    fsdp1_wrap,
    fully_shard_decoder_layers,
    is_fully_sharded,
)
from longact_lightning.stopping import StopCheck, interrupted

if TYPE_CHECKING:
    from lightning.pytorch.core.optimizer import LightningOptimizer
    from transformers import PreTrainedModel

    from longact_lightning.data.scoring import RecordResult

log = logging.getLogger(__name__)

_FUSED_ADAMW_DEVICES = ("cpu", "cuda", "xpu", "mps")


class RLPolicyModule(pl.LightningModule):
    """GRPO-family policy optimisation of a HF causal LM with manual optimisation.

    Per rollout batch: advantages from the group rewards; reference log-probs (when ``beta > 0``) and, for
    ``ppo_epochs > 1``, the old log-probs, both without gradient before the first update; then ``ppo_epochs`` passes
    over the batch in micro-batches, each pass accumulating gradients and ending in one ``optimizer.step()``. The loss
    normaliser counts the whole step (all micro-batches, all ranks), so micro-batching and data parallelism do not
    change the loss (DAPO's token-level mean in particular).

    Every data-parallel strategy runs the same code: DDP replicates the policy; under Lightning's ``FSDPStrategy``
    (FSDP1) and ``ModelParallelStrategy`` (FSDP2), :meth:`configure_model` shards it, one unit per decoder layer plus
    the root. Under FSDP every
    forward and backward pass is a collective, so each rank runs the same number of passes per step (padding passes
    of zero weight where a rank has fewer micro-batches), gradient clipping uses the global norm of the sharded
    gradients, and the weight sync and export gather the full weights on every rank a piece at a time. The policy is
    loaded in ``__init__`` on every rank (each rank briefly holds a full copy before sharding).

    Args:
        model: HF model directory, hub id, or ``"smollm2-135m-instruct"`` (the embedded model).
        tokenizer: tokenizer name or path; ``None`` uses ``model``'s. Only saved next to exports.
        dtype: dtype the weights are loaded in (``"float32"``, ``"bfloat16"``, ``"float16"``). Mixed precision is
            Lightning's ``Trainer(precision=...)``.
        loss: the policy loss and its knobs (:class:`~longact_lightning.rl.losses.LossConfig`: ``loss_type`` =
            ``grpo`` | ``dapo`` | ``dr_grpo`` | ``gspo`` | ``kl_cov`` | ``clip_cov``, clip ranges and dual clip,
            aggregation, Dr.GRPO's ``max_completion_length``, ``beta`` (KL to a frozen reference copy of ``model``,
            loaded when > 0) and its estimator, the entropy bonus, KL-Cov / Clip-Cov, the TIS cap). In a config:
            ``model.loss.loss_type: dapo``; on the command line ``--model.loss.beta 0.04``.
        advantage_std: ``group`` | ``batch`` | ``none`` std scaling; ``None`` = ``none`` for Dr.GRPO, else ``group``.
        advantage_eps: epsilon added to the std.
        leave_one_out: use the leave-one-out mean as the baseline (RLOO).
        temperature: the rollout's sampling temperature; logits are divided by it before scoring.
        lr: AdamW learning rate.
        weight_decay: AdamW decoupled weight decay.
        betas: AdamW betas.
        ppo_epochs: optimizer steps per rollout batch (mu >= 1); with 1 the old log-probs equal the current ones and
            their extra forward pass is skipped. ``Trainer(max_steps=...)`` counts optimizer steps, so a rollout batch
            advances ``global_step`` by ``ppo_epochs``; use a multiple of it.
        micro_batch_size: sequences per forward/backward pass. With ``share_prompt`` the groups of a micro-batch run
            together (one prompt pass, one packed completion pass), so whole groups per micro-batch are fastest;
            more groups per micro-batch trade activation memory for fewer, larger passes.
        max_tokens_per_micro_batch: pack micro-batches by tokens instead (replaces ``micro_batch_size``): whole
            groups per pass while their padded tokens fit, a larger group split into parts that each encode the
            prompt once; one sequence longer than the budget runs alone. The setting for long context.
        balance_ranks: with several ranks, pool the step's groups and deal them out by tokens (and compute
            advantages over the pool); off = each rank trains on the rollouts it generated.
        sequence_parallel_size: split each sequence over this many consecutive ranks (Ulysses: attention heads
            exchanged by all-to-all), for sequences one device cannot hold; 1 = off. Must divide the world size and
            the attention heads. Scores sequences whole (no prompt sharing); tested with DDP.
        attn_implementation: the trainer's attention kernel (``sdpa``, ``eager``, ``flash_attention_2``, ...). Prompt
            sharing needs one that takes a 4D mask (``sdpa``, ``eager``); with another, sequences are scored whole.
        rope_scaling: RoPE scaling for contexts beyond the model's (YaRN, linear, dynamic), merged into the model's
            ``rope_parameters``. The rollout engine must use the same (vLLM: ``data.engine_options.hf_overrides``);
            the first weight sync refuses a mismatch.
        max_grad_norm: clip the global gradient norm to this in ``on_before_optimizer_step``; ``None`` = no clipping.
        max_nonfinite_steps: a step whose gradient norm is NaN or infinite (a NaN loss, an overflow) is skipped, the
            weights and optimizer state untouched and ``train/skipped_steps`` counting it; after this many in a row
            the run stops with an error, the weights still those of the last finite step.
        hybrid_shard_replicas: FSDP2 only: shard within groups of ``world_size / R`` ranks and replicate across ``R``
            groups (HSDP; ``R`` = the number of nodes keeps the all-gathers inside a node). 1 = shard over all ranks.
        gradient_checkpointing: recompute each decoder layer's activations in the backward pass (HF gradient
            checkpointing); works with ``share_prompt`` (the prompt's K/V stay in the graph).
        share_prompt: encode each group's prompt once and reuse its KV cache for the G completions (same values and
            gradients, about G times less prompt work); see ``grouped_completion_logprobs``.
        vocab_chunk_tokens: score the vocabulary (log-softmax, entropy) this many completion tokens at a time, each
            chunk recomputed in backward, so the fp32 ``[tokens, vocab]`` temporaries of long completions stay bounded
            (see ``token_logprobs``); ``None`` = all at once.
        pad_to_multiple_of: round every scoring pass's sequence length up to a multiple of this (1 = none). Fewer
            distinct shapes bound the native memory CPU kernels keep per shape, for a few padding tokens per pass;
            see ``grouped_completion_logprobs``.
        export_dir: where to write the HF-format policy at the end of fit (``None`` = no export).
        export_every_n_steps: also export every N optimizer steps to ``export_dir/step_XXXXXX``.
    """

    reference: PreTrainedModel | None  # set with object.__setattr__ in __init__, see there

    def __init__(
        self,
        model: str = EMBEDDED_MODEL,
        tokenizer: str | None = None,
        dtype: str = "float32",
        loss: LossConfig = LossConfig(),
        advantage_std: StdScaling | None = None,
        advantage_eps: float = 1e-6,
        leave_one_out: bool = False,
        temperature: float = 1.0,
        lr: float = 1e-6,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        ppo_epochs: int = 1,
        micro_batch_size: int = 4,
        max_tokens_per_micro_batch: int | None = None,
        balance_ranks: bool = True,
        sequence_parallel_size: int = 1,
        max_grad_norm: float | None = 1.0,
        max_nonfinite_steps: int = 3,
        attn_implementation: str = "sdpa",
        rope_scaling: dict[str, Any] | None = None,
        hybrid_shard_replicas: int = 1,
        gradient_checkpointing: bool = False,
        share_prompt: bool = True,
        pad_to_multiple_of: int = 16,
        vocab_chunk_tokens: int | None = 1024,
        export_dir: str | None = None,
        export_every_n_steps: int | None = None,
    ) -> None:
        super().__init__()
        if isinstance(loss, Mapping):  # a checkpoint's hyper-parameters hold it as a dict (see below)
            loss = LossConfig(**loss)
        # The loss settings are saved as a plain dict: checkpoints are read with torch.load(weights_only=True),
        # which refuses classes of ours.
        self.save_hyperparameters(ignore=["loss"])
        self.hparams["loss"] = dataclasses.asdict(loss)
        self.automatic_optimization = False
        self.loss_config = loss
        _validate_training_args(
            advantage_std, advantage_eps, temperature, lr, weight_decay, betas, ppo_epochs, micro_batch_size,
            max_tokens_per_micro_batch, pad_to_multiple_of, vocab_chunk_tokens, max_grad_norm, export_dir,
            export_every_n_steps,
        )  # fmt: skip
        if sequence_parallel_size < 1:
            raise ValueError(f"sequence_parallel_size={sequence_parallel_size} must be >= 1 (1 = off).")
        if max_nonfinite_steps < 1:
            raise ValueError(f"max_nonfinite_steps={max_nonfinite_steps} must be >= 1 (non-finite steps in a row).")
        self._nonfinite_in_a_row = 0
        self._skipped_steps = 0
        if hybrid_shard_replicas < 1:
            raise ValueError(f"hybrid_shard_replicas={hybrid_shard_replicas} must be >= 1 (1 = shard over all ranks).")
        self.advantage_std: StdScaling = advantage_std or ("none" if loss.loss_type == "dr_grpo" else "group")
        # Typed copies of the settings the hooks read (``self.hparams`` is an untyped ``AttributeDict``); the saved
        # hyperparameters stay what checkpoints record and compare on resume.
        self.advantage_eps, self.leave_one_out, self.temperature = advantage_eps, leave_one_out, temperature
        self.lr, self.weight_decay, self.betas = lr, weight_decay, betas
        self.ppo_epochs, self.micro_batch_size = ppo_epochs, micro_batch_size
        self.max_tokens_per_micro_batch, self.balance_ranks = max_tokens_per_micro_batch, balance_ranks
        self.sequence_parallel_size, self.hybrid_shard_replicas = sequence_parallel_size, hybrid_shard_replicas
        self.max_grad_norm, self.max_nonfinite_steps = max_grad_norm, max_nonfinite_steps
        self.share_prompt, self.pad_to_multiple_of = share_prompt, pad_to_multiple_of
        self.vocab_chunk_tokens = vocab_chunk_tokens
        self.export_dir, self.export_every_n_steps = export_dir, export_every_n_steps

        self.tokenizer = load_tokenizer(tokenizer or model)
        options: dict[str, Any] = {
            "dtype": dtype,
            "attn_implementation": attn_implementation,
            "rope_scaling": rope_scaling,
        }
        self.policy = load_causal_lm(model, **options)
        self.policy.config.use_cache = False
        # from_pretrained returns eval mode and Lightning 2.6 keeps each module's mode; HF only checkpoints in train
        # mode. Old and new log-probs are both taken in train mode, so they agree as long as dropout is 0.
        self.policy.train()
        if gradient_checkpointing:
            self.policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        reference = None
        if loss.beta > 0:
            reference = load_causal_lm(model, **options).eval().requires_grad_(False)
        # Deliberately not a registered submodule: the frozen reference is rebuilt from `model`, so it stays out of
        # checkpoints, the optimizer, DDP/FSDP wrapping and the callbacks' search for the trainable HF model.
        object.__setattr__(self, "reference", reference)
        self._batch_size = 1
        self._sp_group: Any = None
        self._should_stop = StopCheck(None)
        # per "<stage>/<task>" score of held-out records; not submodules, so not in the checkpoint or the optimizer
        self._held_out_scores: dict[str, MeanMetric] = {}

    @override
    def configure_model(self) -> None:
        """Shard the policy (and the reference) with FSDP2 under ``ModelParallelStrategy``; under Lightning's
        ``FSDPStrategy`` wrap the policy as the FSDP1 root, with buffers (RoPE ``inv_freq``) and gradient reduction in
        fp32 (see ``longact_lightning.sharding``). Nothing otherwise, and nothing without a Trainer:
        ``load_from_checkpoint`` calls this hook to rebuild the module for inference or export, unsharded."""
        if self._trainer is None:
            return
        strategy = self.trainer.strategy
        if isinstance(strategy, FSDPStrategy) and fsdp1_root(self.policy) is None:
            self.policy = fsdp1_wrap(self.policy, strategy)
        if self.device_mesh is None or is_fully_sharded(self.policy):
            return
        mesh = data_parallel_mesh(strategy.root_device.type, self.trainer.world_size, self.hybrid_shard_replicas)
        for model in (self.policy, self.reference):
            if model is not None:
                fully_shard_decoder_layers(model, mesh)

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.policy.parameters() if p.requires_grad]
        # The fused kernel updates a tensor in one pass instead of about ten: 0.06 s instead of 0.6 s per step for
        # SmolLM2's 135M fp32 parameters on 2 CPU cores, and no state-sized temporaries.
        fused = all(p.device.type in _FUSED_ADAMW_DEVICES for p in params)
        beta1, beta2 = self.betas  # a tuple whatever sequence the arguments gave (a config file's list)
        return torch.optim.AdamW(
            params, lr=self.lr, weight_decay=self.weight_decay, betas=(beta1, beta2),
            fused=fused or None,
        )  # fmt: skip

    @override
    def on_fit_start(self) -> None:
        self._sp_group = sequence_parallel_group(self.sequence_parallel_size, self.trainer.world_size)
        self._should_stop = StopCheck(self.trainer)
        if self.reference is not None:
            # transformers wraps PreTrainedModel.to in functools.wraps, which mypy binds without its `self`
            self.reference.to(device=self.device, dtype=self.policy.dtype)  # type: ignore[call-arg]
        self._connect_datamodule()

    @override
    def on_validation_start(self) -> None:
        self._connect_datamodule()  # `longact validate` runs without fit: the engine must serve these weights

    @override
    def on_test_start(self) -> None:
        self._connect_datamodule()

    def _connect_datamodule(self) -> None:
        connect = getattr(getattr(self.trainer, "datamodule", None), "connect", None)
        if callable(connect):
            connect(self.policy, lambda: self.trainer.global_step)

    @override
    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        """Held-out batches stay as they are: scored results, no tensors (and frozen dataclasses, which Lightning's
        device transfer refuses to copy). Training batches are moved in ``training_step``."""
        if self.trainer.validating or self.trainer.testing or self.trainer.sanity_checking:
            return batch
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    @override
    def validation_step(self, results: list[RecordResult], batch_idx: int) -> None:
        """``results``: this rank's scored greedy completions of held-out records (``RolloutDataModule``)."""
        self._held_out_update("val", results)

    @override
    def test_step(self, results: list[RecordResult], batch_idx: int) -> None:
        self._held_out_update("test", results)

    @override
    def on_validation_epoch_end(self) -> None:
        self._held_out_log("val")

    @override
    def on_test_epoch_end(self) -> None:
        self._held_out_log("test")

    def _held_out_update(self, stage: str, results: list[RecordResult]) -> None:
        for result in results:
            key = f"{stage}/{result.task}"
            if key not in self._held_out_scores:
                self._held_out_scores[key] = MeanMetric().to(self.device)
            self._held_out_scores[key].update(100.0 * result.score)

    def _held_out_log(self, stage: str) -> None:
        """Log ``<stage>/<task>/score`` (percent, as ``longact eval`` reports) over all ranks' records, and their mean
        over tasks as ``<stage>/score``. Every rank computes the same metrics in the same order (each ``compute`` is a
        collective), so a task that only other ranks saw is computed here too, from empty states.

        The computed scores are equal on every rank; they are logged with ``sync_dist`` and ``reduce_fx="max"``, which
        leaves an equal value unchanged bit for bit (a mean over ranks would round) and tells Lightning the value is
        synchronised."""
        keys = [key for key in self._held_out_scores if key.startswith(f"{stage}/")]
        if self.trainer.world_size > 1 and torch.distributed.is_initialized():
            gathered: list[list[str] | None] = [None] * self.trainer.world_size
            torch.distributed.all_gather_object(gathered, keys)
            keys = [key for keys_of_rank in gathered for key in keys_of_rank or []]
        scores = []
        for key in sorted(set(keys)):
            metric = self._held_out_scores.setdefault(key, MeanMetric().to(self.device))
            score = metric.compute()
            metric.reset()
            self.log(f"{key}/score", score, on_epoch=True, sync_dist=True, reduce_fx="max")
            scores.append(score)
        if scores:
            self.log(f"{stage}/score", torch.stack(scores).mean(), on_epoch=True, sync_dist=True, reduce_fx="max")

    @override
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Before the step's rollouts are pulled, and outside any forward: gathering sharded weights is a collective
        # that FSDP1 refuses inside one (and a LightningModule wrapped by FSDP runs training_step inside one).
        sync_weights = getattr(getattr(self.trainer, "datamodule", None), "sync_weights", None)
        if callable(sync_weights):
            sync_weights()

    @override
    def training_step(self, dataloader_iter: Iterator[tuple[RolloutBatch, int, int]]) -> None:
        start = time.perf_counter()
        batch, _, _ = next(dataloader_iter)  # pulled here, after the previous update: the rollouts are on-policy
        batch, advantages = self._share_of_step(batch)  # [B], this rank's rows
        batch, advantages = batch.to(self.device), advantages.to(self.device)
        self._batch_size = len(batch)
        mask = batch.completion_mask.float()  # [B, C]
        chunks = self._micro_batches(batch)  # (rows, zero-weight padding pass?)
        aggregation = self.loss_config.resolved_aggregation
        local = step_denominator(mask, aggregation, self.loss_config.max_completion_length).to(self.device)
        # the ranks of a sequence-parallel group hold the same rows: count them once
        sp = self.sequence_parallel_size
        denominator = float((self.trainer.strategy.reduce(local, reduce_op="sum") / sp).clamp(min=1))
        # DDP/FSDP average gradients over ranks; the loss already divides by the global count, so undo the average
        # (a sequence-parallel group's S ranks each get S times their share back, see sequence_parallel_completion_...).
        scale = float(self.trainer.world_size) / sp

        with torch.no_grad():
            ref_logprobs = self._score(self.reference, batch, chunks) if self.reference is not None else None
            old_logprobs = self._score(self.policy, batch, chunks) if self.ppo_epochs > 1 else None

        optimizer = self.optimizers()
        assert not isinstance(optimizer, list)  # configure_optimizers returns one optimizer
        sums: dict[str, float] = {}
        tokens_seen = 0.0
        step_loss = 0.0
        for epoch in range(self.ppo_epochs):
            optimizer.zero_grad()
            with autocast_weights_once(self.device.type):  # one weight cast per optimizer step
                for k, (chunk, padding) in enumerate(chunks):
                    if epoch == 0:  # before the first update the step can still be abandoned whole
                        self._stop_if_requested("the update passes", optimizer)
                    micro = batch.select(chunk)
                    with self._no_sync_unless(k == len(chunks) - 1), self._sequence_parallel():
                        if padding:  # keeps this rank's collectives in step with the others'
                            with padding_only():
                                self.manual_backward(self._logprobs(self.policy, micro)[0].sum() * 0.0)
                            continue
                        logprobs, entropy = self._logprobs(self.policy, micro)  # [b, C], [b, C]
                        assert entropy is not None  # with_entropy is on
                        loss, metrics = policy_loss(
                            logprobs,
                            old_logprobs[chunk] if old_logprobs is not None else logprobs.detach(),
                            advantages[chunk],
                            mask[chunk],
                            self.loss_config,
                            denominator,
                            ref_logprobs=ref_logprobs[chunk] if ref_logprobs is not None else None,
                            entropy=entropy,
                            engine_logprobs=micro.engine_logprobs,
                        )
                        self.manual_backward(loss * scale)
                    micro_tokens = float(mask[chunk].sum())
                    metrics["entropy"] = (entropy.detach() * mask[chunk]).sum() / max(micro_tokens, 1.0)
                    for name, value in metrics.items():
                        sums[name] = sums.get(name, 0.0) + float(value) * micro_tokens
                    tokens_seen += micro_tokens
                    step_loss += float(loss.detach())
            optimizer.step()
            self._maybe_export_periodically()

        self._log_step(batch, sums, tokens_seen, step_loss / self.ppo_epochs, time.perf_counter() - start)

    @override
    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # Lightning runs the callbacks' hook first (the LongAct row mask zeroes frozen rows there), then this one, so
        # the norm is that of the gradient that is actually applied. Manual optimisation gets no automatic clipping.
        max_norm = self.max_grad_norm
        grad_norm = clip_grad_norm(self.policy, max_norm)  # equal on every rank; None measures without clipping
        if not torch.isfinite(grad_norm):
            self._skip_update(optimizer, float(grad_norm))
        else:
            self._nonfinite_in_a_row = 0
        self.log("train/skipped_steps", float(self._skipped_steps), on_step=True, on_epoch=False)
        if max_norm is not None:
            self.log("train/grad_norm", grad_norm, on_step=True, on_epoch=False)

    def _skip_update(self, optimizer: torch.optim.Optimizer, grad_norm: float) -> None:
        """Drop every gradient, so the optimizer leaves every parameter and its state alone (AdamW, like torch's
        other optimizers, skips parameters without a gradient: no step, no weight decay, no moment update)."""
        optimizer.zero_grad(set_to_none=True)
        self._skipped_steps += 1
        self._nonfinite_in_a_row += 1
        limit = self.max_nonfinite_steps
        log.warning(
            "Step %d: gradient norm %s; the update is skipped (%d in a row, the run stops at %d).",
            self.trainer.global_step, grad_norm, self._nonfinite_in_a_row, limit,
        )  # fmt: skip
        if self._nonfinite_in_a_row >= limit:
            raise RuntimeError(
                f"{limit} steps in a row had a non-finite gradient norm ({grad_norm}); stopping with the weights of "
                "the last finite step. Check the rewards (rollout/reward_failures_total), lower model.lr, or raise "
                "model.max_nonfinite_steps."
            )

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Resuming trains this run's settings on the checkpoint's weights: refuse a checkpoint of another model (its
        weights would silently replace the one asked for), and name every other setting that changed."""
        saved = checkpoint.get("hyper_parameters", {})
        current = dict(self.hparams)
        if "model" in saved and not _same_model(saved["model"], current["model"]):
            raise ValueError(
                f"The checkpoint was trained from model={saved['model']!r}, this run asks for "
                f"model={current['model']!r}: resuming would train the checkpoint's weights under the new name. Resume "
                "with the checkpoint's model, or start a new run (no ckpt_path) to train the other one."
            )
        saved, current = _flat(saved), _flat(current)
        changed = {key: (saved[key], value) for key, value in current.items() if key in saved and saved[key] != value}
        if changed:
            rank_zero_warn(
                "Resuming with settings that differ from the checkpoint's, applied from this step on: "
                + ", ".join(f"model.{key}: {old!r} -> {new!r}" for key, (old, new) in sorted(changed.items()))
            )

    @override
    def log(self, name: str, value: Any, *args: Any, batch_size: int | None = None, **kwargs: Any) -> None:
        """``LightningModule.log`` with a default ``batch_size``: with the ``dataloader_iter`` signature Lightning
        cannot infer it and rejects every ``log`` call without one — including callbacks logging through
        ``pl_module.log``. It only weights epoch-level means, so the current rollout batch size is a correct default.
        """
        # in kwargs: as a keyword next to *args, mypy would count it as possibly given twice
        kwargs["batch_size"] = batch_size or self._batch_size
        super().log(name, value, *args, **kwargs)

    @override
    def on_train_end(self) -> None:
        if self.export_dir is not None:
            self.export(Path(self.export_dir))

    def export(self, directory: Path) -> None:
        """Write the policy and tokenizer in HF format (transformers and vLLM load it).

        Every rank takes part in gathering sharded weights (a collective); rank zero keeps them and writes."""
        zero = self.trainer.is_global_zero
        state = {}
        for name, tensor in full_named_parameters(self.policy):
            if zero:
                state[name] = tensor.cpu()
        if zero:
            directory.mkdir(parents=True, exist_ok=True)
            self.policy.save_pretrained(directory, state_dict=state)
            self.tokenizer.save_pretrained(directory)
        self.trainer.strategy.barrier("rl_export")

    def _maybe_export_periodically(self) -> None:
        every = self.export_every_n_steps
        if every is not None and self.global_step % every == 0:
            assert self.export_dir is not None  # export_every_n_steps without export_dir is refused in __init__
            self.export(Path(self.export_dir) / f"step_{self.global_step:06d}")

    def _share_of_step(self, batch: RolloutBatch) -> tuple[RolloutBatch, torch.Tensor]:
        """This rank's rows of the step's rollouts and their advantages.

        With several ranks and ``balance_ranks`` (always under sequence parallelism), every rank's groups are pooled,
        advantages computed over the pool (so ``advantage_std="batch"`` scales by the whole step's spread, as one
        process would) and the groups dealt out again by scoring tokens, one share per data-parallel group (the ranks
        of a sequence-parallel group share theirs), so no rank waits for one that drew all the long prompts.
        Otherwise the rank keeps its own."""
        world, sp = self.trainer.world_size, self.sequence_parallel_size
        pooled = world > 1 and (self.balance_ranks or sp > 1)
        if pooled:
            batches: list[Any] = [None] * world
            torch.distributed.all_gather_object(batches, batch.to("cpu"))
            batch = RolloutBatch.concat(batches)
        advantages = group_advantages(
            batch.rewards, batch.group_ids, self.advantage_std, self.advantage_eps, self.leave_one_out
        )  # [B]
        if not pooled:
            return batch, advantages
        groups = list(
            group_costs(batch.attention_mask, batch.prompt_length, batch.group_ids, self._shares_prompt).values()
        )
        mine = balanced_partition([cost for _, cost in groups], world // sp)[self.trainer.global_rank // sp]
        rows = torch.tensor(sorted(row for g in mine for row in groups[g][0]))
        return batch.select(rows), advantages[rows]

    @property
    def _shares_prompt(self) -> bool:
        """Whether groups are scored with their prompt encoded once (sequence parallelism scores sequences whole)."""
        return self.share_prompt and self.sequence_parallel_size == 1

    def _sequence_parallel(self) -> Any:
        """Forward and backward of a micro-batch run inside this, so activation checkpointing's recompute in backward
        also attends over the whole sequence."""
        if self.sequence_parallel_size == 1:
            return nullcontext()
        return ulysses(self.policy, self._sp_group)

    def _micro_batches(self, batch: RolloutBatch) -> list[tuple[torch.Tensor, bool]]:
        """This rank's micro-batches as ``(rows, False)``, then ``(last rows, True)`` zero-weight padding passes until
        it has as many as the rank with the most micro-batches."""
        if self.max_tokens_per_micro_batch is None:
            rows = torch.arange(len(batch)).split(self.micro_batch_size)
        else:
            plan = plan_micro_batches(
                batch.attention_mask, batch.prompt_length, batch.group_ids, self.max_tokens_per_micro_batch,
                self._shares_prompt,
            )  # fmt: skip
            rows = [torch.tensor(micro) for micro in plan]
        chunks = [(micro.to(self.device), False) for micro in rows]
        if self.trainer.world_size == 1:
            return chunks
        most = int(self.trainer.strategy.reduce(torch.tensor(len(chunks), device=self.device), reduce_op="max"))
        return chunks + [(chunks[-1][0], True)] * (most - len(chunks))

    def _score(
        self, model: PreTrainedModel, batch: RolloutBatch, chunks: list[tuple[torch.Tensor, bool]]
    ) -> torch.Tensor:
        """Log-probs of the whole batch under ``model``, micro-batch by micro-batch (padding passes run and are
        dropped).  # [B, C]"""
        scores = torch.zeros(batch.completion_mask.shape, device=self.device)
        for chunk, padding in chunks:
            self._stop_if_requested("the scoring passes")
            with padding_only() if padding else nullcontext():
                logprobs = self._logprobs(model, batch.select(chunk), with_entropy=False)[0]
            if not padding:
                scores[chunk] = logprobs
        return scores

    def _stop_if_requested(self, where: str, optimizer: LightningOptimizer | None = None) -> None:
        """Abandon the step on SIGTERM (every rank at the same pass, see ``longact_lightning.stopping``); the weights
        and optimizer state are those of the last completed step, and the partial gradient is dropped."""
        if self._should_stop.agreed():
            if optimizer is not None:
                optimizer.zero_grad(set_to_none=True)
            raise interrupted(where)

    def _logprobs(
        self, model: PreTrainedModel, batch: RolloutBatch, with_entropy: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Completion log-probs (and entropies) of ``batch`` under ``model``.  # [b, C], [b, C]"""
        args = (model, batch.input_ids, batch.attention_mask, batch.completion_mask.shape[1])
        if self.sequence_parallel_size > 1:
            return sequence_parallel_completion_logprobs(
                *args, self.temperature, with_entropy, self.vocab_chunk_tokens, self._sp_group
            )
        options: dict[str, Any] = {
            "with_entropy": with_entropy, "pad_to_multiple_of": self.pad_to_multiple_of,
            "chunk_tokens": self.vocab_chunk_tokens, "temperature": self.temperature,
        }  # fmt: skip
        if self._shares_prompt:
            return grouped_completion_logprobs(*args, batch.group_ids, **options)
        return completion_logprobs(*args, **options)

    def _no_sync_unless(self, sync: bool) -> Any:
        """Skip DDP's gradient all-reduce on all but the last micro-batch of an accumulation."""
        strategy = self.trainer.strategy
        if sync or not isinstance(strategy, ParallelStrategy):
            return nullcontext()
        return strategy.block_backward_sync()

    def _log_step(
        self, batch: RolloutBatch, sums: dict[str, float], tokens: float, loss: float, seconds: float
    ) -> None:
        completion_lengths = batch.attention_mask[:, batch.prompt_length :].sum(-1).float()  # [B]
        values: dict[str, float | torch.Tensor] = {
            f"train/{name}": total / max(tokens, 1.0) for name, total in sums.items()
        }
        values["train/reward_mean"] = batch.rewards.float().mean()
        values["train/reward_std"] = batch.rewards.float().std() if len(batch) > 1 else 0.0
        values["train/completion_length"] = completion_lengths.mean()
        values["train/truncated_ratio"] = batch.truncated.float().mean()
        values["train/tokens_per_s"] = float(batch.attention_mask.sum()) / max(seconds, 1e-9)
        if batch.correct is not None:
            values["train/accuracy"] = batch.correct.float().mean()
        self.log_dict(values, on_step=True, on_epoch=False, sync_dist=True)
        # each rank's loss is its share of the global loss, so the global value is the sum
        loss /= self.sequence_parallel_size  # a sequence-parallel group's ranks each hold its whole loss
        self.log("train/loss", loss, on_step=True, on_epoch=False, sync_dist=True, reduce_fx="sum", prog_bar=True)


def _validate_training_args(
    advantage_std: str | None,
    advantage_eps: float,
    temperature: float,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    ppo_epochs: int,
    micro_batch_size: int,
    max_tokens_per_micro_batch: int | None,
    pad_to_multiple_of: int,
    vocab_chunk_tokens: int | None,
    max_grad_norm: float | None,
    export_dir: str | None,
    export_every_n_steps: int | None,
) -> None:
    """Reject bad arguments before any model is loaded, naming the value and the fix."""
    if advantage_std not in (None, "group", "batch", "none"):
        raise ValueError(f"advantage_std={advantage_std!r} is not supported; use 'group', 'batch', 'none' or None.")
    if advantage_eps < 0:
        raise ValueError(f"advantage_eps={advantage_eps} must be >= 0 (1e-6 is usual).")
    if not temperature > 0:
        raise ValueError(f"temperature={temperature} must be > 0; set it to the rollout's sampling temperature.")
    if not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr={lr} must be a positive finite number (1e-6 is typical for full RL fine-tuning).")
    if weight_decay < 0:
        raise ValueError(f"weight_decay={weight_decay} must be >= 0.")
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise ValueError(f"betas={betas} must be two numbers in [0, 1), e.g. (0.9, 0.999).")
    if ppo_epochs < 1:
        raise ValueError(f"ppo_epochs={ppo_epochs} must be >= 1 (optimizer steps per rollout batch).")
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size={micro_batch_size} must be >= 1 (sequences per forward pass).")
    if max_tokens_per_micro_batch is not None and max_tokens_per_micro_batch < 1:
        raise ValueError(
            f"max_tokens_per_micro_batch={max_tokens_per_micro_batch} must be >= 1 (tokens per forward pass), or None."
        )
    if pad_to_multiple_of < 1:
        raise ValueError(f"pad_to_multiple_of={pad_to_multiple_of} must be >= 1 (1 = no padding).")
    if vocab_chunk_tokens is not None and vocab_chunk_tokens < 1:
        raise ValueError(f"vocab_chunk_tokens={vocab_chunk_tokens} must be >= 1 (tokens per chunk), or None.")
    if max_grad_norm is not None and not max_grad_norm > 0:
        raise ValueError(f"max_grad_norm={max_grad_norm} must be > 0, or None to disable clipping.")
    if export_every_n_steps is not None:
        if export_every_n_steps < 1:
            raise ValueError(f"export_every_n_steps={export_every_n_steps} must be >= 1, or None.")
        if export_dir is None:
            raise ValueError(f"export_every_n_steps={export_every_n_steps} needs export_dir; set export_dir too.")


def _same_model(a: str, b: str) -> bool:
    """The same name, or two spellings of one existing directory."""
    if a == b:
        return True
    first, second = Path(a).expanduser(), Path(b).expanduser()
    return first.exists() and second.exists() and first.resolve() == second.resolve()


def _flat(settings: Mapping[str, Any]) -> dict[str, Any]:
    """``{"loss": {"beta": 0.1}}`` -> ``{"loss.beta": 0.1}``: a changed setting is named by its config key."""
    flat: dict[str, Any] = {}
    for key, value in settings.items():
        if isinstance(value, Mapping):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    return flat
