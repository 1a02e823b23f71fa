"""The DataModule that turns a prompt stream into on-policy training batches of whole rollout groups.

Rollouts are generated lazily, inside ``next(dataloader)``: the RL module pulls its batch itself at the start of each
training step (``training_step(dataloader_iter)``), after the previous optimizer step, and has pushed the policy's
weights into the engine just before (:meth:`RolloutDataModule.sync_weights`, from ``on_train_batch_start``: outside
any forward pass, where sharded weights can be gathered). So the rollouts used at step ``t`` come from the
weights after step ``t - 1``. That is why the DataLoader has no workers and no batching of its own: the engine lives
in this process and each item already is a full training batch.

Under data parallelism (DDP, FSDP) every rank has its own DataModule and engine. Rank ``r`` of ``W`` takes the
records ``r, r + W, r + 2W, ...`` of each pass of the source, samples with its own seed, and the ranks agree on every
batch boundary (one small all-gather per batch): a pass ends for all ranks as soon as it ends for one, and a rank
whose dynamic sampling gives up stops them all with the same error, so no rank is left waiting in a collective. The
checkpointed stream position holds every rank's position, so a resumed run with the same world size replays no
consumed prompt (with a different world size every rank continues after the furthest position: still no replay, at
most a few unseen records skipped).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from itertools import islice
from typing import Any, Literal

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, IterableDataset
from typing_extensions import override

from longact_lightning.data.group_rewards import GroupRewards
from longact_lightning.data.records import PromptRecord, chat_prompt_ids
from longact_lightning.data.rewards import RewardFn, resolve_reward
from longact_lightning.data.scoring import RecordResult, evaluate_records, generation_budget
from longact_lightning.data.sources import PromptSource
from longact_lightning.models import EMBEDDED_MODEL, load_tokenizer
from longact_lightning.rollout import build_engine
from longact_lightning.rollout.base import GenerationInterrupted, Rollout, RolloutEngine, SamplingConfig
from longact_lightning.rollout.batch import RolloutBatch
from longact_lightning.rollout.weight_sync import check_same_positions, full_named_parameters
from longact_lightning.stopping import StopCheck, interrupted

log = logging.getLogger(__name__)


@dataclass
class _ScoredGroup:
    rollouts: list[Rollout]
    rewards: list[float]  # task reward + overlong penalty: what the advantage sees
    correct: list[bool]  # the task reward alone reached 1


class RolloutDataModule(LightningDataModule):
    """Streams prompts, samples ``group_size`` completions each with the rollout engine, scores them, and yields
    :class:`~longact_lightning.rollout.batch.RolloutBatch` es of ``prompts_per_step`` whole groups.

    Args:
        source: the prompts: a :class:`~longact_lightning.data.sources.PromptSource` (RULER, LongBench v2, JSONL, HF
            datasets; built by LightningCLI from ``class_path``) or any iterable of ``PromptRecord``. It is iterated
            again from the start for each pass (epoch).
        model: model whose tokenizer applies the chat template and whose weights the engine starts from; the same
            model as the policy's.
        engine: ``"vllm"`` (falls back to ``"hf"`` with a warning when vLLM is missing) or ``"hf"``.
        engine_options: keyword arguments of the engine (``VLLMEngine``: ``dtype``, ``max_model_len``,
            ``gpu_memory_utilization``, ``enable_sleep_mode``, ``kv_cache_gib``, ``enforce_eager``,
            ``logprobs_mode``, ...; ``HFEngine``: ``dtype``, ``device``, ``max_batch_sequences``, ...).
        group_size: completions per prompt, ``G``.
        prompts_per_step: groups per training batch (fewer when the source runs out or dynamic sampling gives up).
        temperature: sampling temperature; the RL module must score with the same one.
        top_p: nucleus sampling mass.
        max_new_tokens: completion length limit ``L_max``.
        seed: base seed of the sampling (``None`` = unseeded). Rank 0 uses it as is; rank ``r > 0`` of a
            data-parallel run derives its own from ``(seed, r)``, so ranks never sample identical completions.
        max_prompt_tokens: prompts longer than this after the chat template are dropped, counted and logged;
            ``None`` keeps all that fit. Prompts that do not fit the engine's context beside ``max_new_tokens`` are
            dropped the same way, on every engine, and so are records with an empty prompt.
        dynamic_sampling: DAPO dynamic sampling: drop groups whose rewards are all equal (zero advantage, no
            gradient) and generate for fresh prompts until ``prompts_per_step`` groups carry signal.
        max_generation_rounds: generation rounds per batch under dynamic sampling; after that the batch is yielded
            with the groups it has (an error if it has none).
        overlong_buffer_tokens: DAPO soft overlong punishment (Eq. 13) buffer ``L_cache``: a completion longer than
            ``max_new_tokens - L_cache`` tokens gets a penalty growing linearly to ``-overlong_penalty`` at
            ``max_new_tokens``. 0 disables it.
        overlong_penalty: the penalty's scale.
        mask_truncated: exclude completions that hit ``max_new_tokens`` from the loss (their ``completion_mask`` is 0).
        reward: a metric name of ``longact_lightning.data.rewards.METRICS``, an import path ``package.module:function``,
            or a callable ``(completion_text, record) -> float``; ``None`` = each task's official metric.
        sync_every_n_steps: push the policy's weights into the engine when at least this many optimizer steps
            happened since the last push (1 = strictly on-policy). Sharded parameters are streamed into the engine
            a piece at a time (FSDP2: one parameter, FSDP1: one FSDP unit; see ``rollout.weight_sync``), so a sync
            never holds a second full copy of the model.
        val_source: held-out prompts for the validation loop (``fit`` every ``trainer.val_check_interval`` training
            batches, and ``longact validate``): greedy completions from the engine, right after a weight push, each
            scored by its task's official metric (:func:`~longact_lightning.data.scoring.evaluate_records`, as
            ``longact eval``); the module logs ``val/<task>/score``. Each rank scores every ``world_size``-th record.
            ``None`` = no validation.
        test_source: the same for ``longact test`` (``test/<task>/score``).
        held_out_max_tokens: tokens to generate per held-out record; ``None`` = each benchmark's own budget (RULER's
            per task, LongBench v2's, InfiniteBench's); required for tasks without one.
        held_out_metric: score held-out records with this instead of each task's official metric (as ``reward``).
        held_out_batch_size: held-out records per engine call (one validation batch).
    """

    def __init__(
        self,
        source: PromptSource | Iterable[PromptRecord],
        model: str = EMBEDDED_MODEL,
        engine: Literal["vllm", "hf"] = "vllm",
        engine_options: dict[str, Any] | None = None,
        group_size: int = 8,
        prompts_per_step: int = 8,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_new_tokens: int = 256,
        seed: int | None = 0,
        max_prompt_tokens: int | None = None,
        dynamic_sampling: bool = False,
        max_generation_rounds: int = 3,
        overlong_buffer_tokens: int = 0,
        overlong_penalty: float = 1.0,
        mask_truncated: bool = False,
        reward: str | RewardFn | None = None,
        sync_every_n_steps: int = 1,
        val_source: PromptSource | Iterable[PromptRecord] | None = None,
        test_source: PromptSource | Iterable[PromptRecord] | None = None,
        held_out_max_tokens: int | None = None,
        held_out_metric: str | RewardFn | None = None,
        held_out_batch_size: int = 32,
    ) -> None:
        super().__init__()
        if not hasattr(source, "__iter__"):
            raise TypeError(f"source={source!r} is not iterable; pass a PromptSource or an iterable of PromptRecord.")
        if group_size < 2:
            raise ValueError(
                f"group_size={group_size}: a group's advantages are its rewards relative to each other, so fewer "
                "than 2 completions per prompt train nothing; use group_size >= 2 (8-16 is usual)."
            )
        if prompts_per_step < 1:
            raise ValueError(f"prompts_per_step={prompts_per_step} must be >= 1.")
        if max_prompt_tokens is not None and max_prompt_tokens < 1:
            raise ValueError(f"max_prompt_tokens={max_prompt_tokens} must be >= 1, or None to keep every prompt.")
        if max_generation_rounds < 1:
            raise ValueError(f"max_generation_rounds={max_generation_rounds} must be >= 1.")
        if not 0 <= overlong_buffer_tokens < max_new_tokens:
            raise ValueError(
                f"overlong_buffer_tokens={overlong_buffer_tokens} must be in [0, max_new_tokens={max_new_tokens}); "
                "DAPO uses about a quarter of max_new_tokens, 0 disables the penalty."
            )
        if overlong_penalty < 0:
            raise ValueError(f"overlong_penalty={overlong_penalty} must be >= 0 (it is subtracted from the reward).")
        if sync_every_n_steps < 1:
            raise ValueError(f"sync_every_n_steps={sync_every_n_steps} must be >= 1 (1 = sync after every step).")
        for name, held_out in (("val_source", val_source), ("test_source", test_source)):
            if held_out is not None and not hasattr(held_out, "__iter__"):
                raise TypeError(f"{name}={held_out!r} is not iterable; pass a PromptSource or PromptRecords.")
        if held_out_max_tokens is not None and held_out_max_tokens < 1:
            raise ValueError(f"held_out_max_tokens={held_out_max_tokens} must be >= 1, or None for each task's own.")
        if held_out_batch_size < 1:
            raise ValueError(f"held_out_batch_size={held_out_batch_size} must be >= 1.")
        if (engine_options or {}).get("sleep_level") == 2 and sync_every_n_steps > 1:
            raise ValueError(
                f"engine_options.sleep_level=2 discards the engine's weights after each generation, so they must be "
                f"pushed before every one; sync_every_n_steps={sync_every_n_steps} would serve discarded weights. Use "
                "sleep_level 1 or sync_every_n_steps=1."
            )
        self.source = source
        self.model = model
        self.engine_kind = engine
        self.engine_options = dict(engine_options or {})
        self.sampling = SamplingConfig(
            n=group_size, temperature=temperature, top_p=top_p, max_tokens=max_new_tokens, seed=seed
        )
        self.prompts_per_step = prompts_per_step
        self.max_prompt_tokens = max_prompt_tokens
        self.dynamic_sampling = dynamic_sampling
        self.max_generation_rounds = max_generation_rounds
        self.mask_truncated = mask_truncated
        self.sync_every_n_steps = sync_every_n_steps
        self.val_source, self.test_source = val_source, test_source
        self.held_out_max_tokens = held_out_max_tokens
        if isinstance(held_out_metric, str):
            resolve_reward(held_out_metric)  # a bad name or import path fails here, not at the first validation
        self.held_out_metric = held_out_metric
        self.held_out_batch_size = held_out_batch_size
        self._base_seed = seed
        self._rank, self._world = 0, 1  # data-parallel position, known in `setup`
        self.rewards = GroupRewards(reward, max_new_tokens, overlong_buffer_tokens, overlong_penalty)
        self._engine: RolloutEngine | None = None
        self._tokenizer: Any = None
        self._policy: torch.nn.Module | None = None
        self._step_fn: Callable[[], int] | None = None
        self._synced_step: int | None = None
        self._sync_seconds = 0.0  # time spent in syncs since the last batch, reported with that batch
        # stream position: (pass, index after the last record this rank pulled in that pass); checkpointed
        self._epoch = 0
        self._consumed = 0
        # every rank's position after the last yielded batch, and a loaded one not yet applied (the rank is known
        # only once training starts)
        self._positions: list[tuple[int, int]] = [(0, 0)]
        self._pending_positions: list[tuple[int, int]] | None = None
        # the batch being trained: the optimizer step count when it was handed out and the positions before it
        self._in_flight: tuple[int, list[tuple[int, int]]] | None = None
        self._should_stop: StopCheck | None = None  # polled by the engine between decode steps; set in `setup`
        # which stream a position belongs to: this run's source and a loaded checkpoint's
        self._source_id: str | None = None
        self._pending_source_id: str | None = None
        self.totals = {
            "dropped_long_prompts": 0, "dropped_empty_prompts": 0, "dropped_groups": 0, "generation_rounds": 0,
            "weight_syncs": 0,
        }  # fmt: skip
        self._prompt_limit: tuple[int | None, str] | None = None  # (tokens, why): known once the engine is built
        self.metrics: dict[str, float] = {}  # the last batch's rollout metrics, also sent to the trainer's loggers

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.model)
        return self._tokenizer

    @property
    def engine(self) -> RolloutEngine:
        """The rollout engine, built on first use (after the policy is on its device) unless one was assigned."""
        if self._engine is None:
            options = dict(self.engine_options)
            if self.engine_kind == "vllm":
                options.setdefault("seed", self.sampling.seed or 0)
                trainer = self.trainer
                if trainer is not None and trainer.world_size > 1:
                    # one engine per rank, on the rank's own device, inside the trainer's process group
                    options.setdefault("rank", int(trainer.global_rank))
                    options.setdefault("local_rank", int(trainer.local_rank))
                    options.setdefault("world_size", int(trainer.world_size))
            elif self.trainer is not None:
                options.setdefault("device", str(self.trainer.strategy.root_device))  # this rank's device
            self._engine = build_engine(self.engine_kind, self.model, **options)
        return self._engine

    @engine.setter
    def engine(self, engine: RolloutEngine) -> None:
        self._engine = engine

    def connect(self, policy: torch.nn.Module, step_fn: Callable[[], int]) -> None:
        """Register the policy whose weights the engine serves and a function returning the optimizer step count.

        Called by the RL module when fit, validate or test starts (again for the same policy: nothing changes); the
        module then calls :meth:`sync_weights` before every step. Without it the engine keeps serving its initial
        weights.
        """
        if policy is self._policy:
            return
        self._policy = policy
        self._step_fn = step_fn
        self._synced_step = None  # the engine was built from `model`, not from whatever the policy holds now

    @override
    def setup(self, stage: str) -> None:
        """Learn this rank's data-parallel position, hand the tokenizer to the source and pull the first records, so
        an empty source (or one with fewer records than ranks) or a task without a default reward fails before
        training starts."""
        if self.trainer is not None:
            self._rank, self._world = int(self.trainer.global_rank), int(self.trainer.world_size)
            self._should_stop = StopCheck(self.trainer)
        held_out = self.test_source if stage == "test" else self.val_source
        if isinstance(held_out, PromptSource):
            held_out.connect(self.tokenizer)
        if stage != "fit":
            return
        seed = self._base_seed
        if seed is not None and self._rank > 0:
            seed = int(np.random.SeedSequence([seed, self._rank]).generate_state(1)[0])
        self.sampling = replace(self.sampling, seed=seed)
        if isinstance(self.source, PromptSource):
            self.source.connect(self.tokenizer)
        first = list(islice(iter(self.source), self._world))
        if not first:
            raise ValueError(f"Prompt source {self.source!r} yielded no record; point it at non-empty data.")
        if len(first) < self._world:
            raise ValueError(
                f"Prompt source {self.source!r} has {len(first)} record(s) for {self._world} data-parallel ranks; "
                "every rank needs at least one. Use more records or fewer devices."
            )
        self.rewards.for_task(first[0].task)  # a task without a default reward fails now
        self._source_id = _source_id(self.source, first[0])

    @override
    def train_dataloader(self) -> DataLoader:
        return _loader(self._batches)

    @override
    def val_dataloader(self) -> DataLoader | list:
        if self.val_source is None:
            return []  # Lightning then skips the validation loop
        source = self.val_source
        return _loader(lambda: self._held_out(source))

    @override
    def test_dataloader(self) -> DataLoader:
        if self.test_source is None:
            raise ValueError("longact test scores data.test_source, which is not set: point it at held-out prompts.")
        source = self.test_source
        return _loader(lambda: self._held_out(source))

    def _held_out(self, source: Iterable[PromptRecord]) -> Iterator[list[RecordResult]]:
        """This rank's share of ``source`` (records ``rank, rank + W, ...``), completed greedily by the engine with the
        policy's current weights, in batches of ``held_out_batch_size`` scored results. A record whose prompt and
        generation budget do not fit the engine's context is skipped with a warning."""
        self.sync_weights(force=True)
        context = getattr(self.engine, "max_model_len", None)
        mine: list[PromptRecord] = []
        for index, record in enumerate(source):
            if index % self._world != self._rank:
                continue
            budget = generation_budget(record, self.held_out_max_tokens)
            if context is not None and len(self.prompt_ids(record)) + budget > context:
                log.warning(
                    "Held-out record %d (%r) skipped: its prompt and %d tokens to generate exceed the engine's "
                    "%d-token context.", index, record.task, budget, context,
                )  # fmt: skip
                continue
            mine.append(record)
        for start in range(0, len(mine), self.held_out_batch_size):
            chunk = mine[start : start + self.held_out_batch_size]
            yield evaluate_records(self.engine, self.tokenizer, chunk, self.held_out_max_tokens, self.held_out_metric)

    @override
    def state_dict(self) -> dict[str, Any]:
        """The stream position after the last batch that was trained: a batch being generated, or handed out but
        interrupted before its optimizer step (SIGTERM, Ctrl-C), is generated again by a resumed run.

        ``epoch`` / ``prompts_consumed``: the pass and the source index before which every record was consumed (by
        the rank it belongs to; with one rank simply the records pulled); ``rank_positions``: each rank's own
        ``[epoch, index after its last record]``; ``world_size``: their count. The totals are this rank's (rank 0's
        in a checkpoint).
        """
        positions = self._pending_positions or self._positions
        if self._in_flight is not None and self._step_fn is not None and self._step_fn() == self._in_flight[0]:
            positions = self._in_flight[1]  # the last batch handed out has not been trained
        world = len(positions)
        # rank r's next own record is the first index >= its position that is congruent to r
        epoch, consumed = min((e, c + (r - c) % world) for r, (e, c) in enumerate(positions))
        return {
            "epoch": epoch,
            "prompts_consumed": consumed,
            "rank_positions": [list(p) for p in positions],
            "world_size": world,
            "source": self._source_id,
            **self.totals,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        epoch, consumed = int(state_dict.get("epoch", 0)), int(state_dict.get("prompts_consumed", 0))
        positions = state_dict.get("rank_positions") or [[epoch, consumed]]
        # applied when the stream starts, once this rank's data-parallel position is certainly known
        self._pending_positions = [(int(e), int(c)) for e, c in positions]
        self._pending_source_id = state_dict.get("source")
        for key in self.totals:
            self.totals[key] = int(state_dict.get(key, 0))

    def _apply_pending_position(self) -> None:
        """Take this rank's position from a loaded state: its own entry if the world size is unchanged, else the
        furthest of all ranks (no consumed record comes back; a few unseen ones may be skipped)."""
        positions = self._pending_positions
        if positions is None:
            return
        saved, current = self._pending_source_id, self._source_id
        if saved is not None and current is not None and saved != current:
            log.warning(
                "data.source is not the checkpoint's (%s -> %s): its saved position does not apply, so the new "
                "source is read from its beginning.", saved, current,
            )  # fmt: skip
            self._pending_positions = [(0, 0)] * self._world
            return
        if len(positions) == self._world:
            self._epoch, self._consumed = positions[self._rank]
        else:
            self._epoch, self._consumed = max(positions)
            log.warning(
                "Resuming a prompt stream saved by %d rank(s) on %d: every rank continues after the furthest saved "
                "position %s, so no consumed prompt is replayed but up to a few unseen ones are skipped.",
                len(positions), self._world, max(positions),
            )  # fmt: skip

    def prompt_ids(self, record: PromptRecord) -> list[int]:
        """Chat template with the record as the user turn, the assistant header, then ``record.answer_prefix``."""
        return chat_prompt_ids(self.tokenizer, record)

    def _batches(self) -> Iterator[RolloutBatch]:
        self._apply_pending_position()
        if self._pending_positions is not None:
            self._positions, self._pending_positions = self._pending_positions, None
        pass_epoch = self._epoch
        prompts = self._prompts()
        while True:
            kept: list[_ScoredGroup] = []
            dropped = rounds = 0
            exhausted = False
            timings = {"sync_s": self._sync_seconds, "generate_s": 0.0}
            self._sync_seconds = 0.0
            rounds_allowed = self.max_generation_rounds if self.dynamic_sampling else 1
            before = self._positions
            stopped = False
            while len(kept) < self.prompts_per_step and rounds < rounds_allowed and not stopped:
                chunk = list(islice(prompts, self.prompts_per_step - len(kept)))
                if not chunk:
                    exhausted = True
                    break
                rounds += 1
                start = time.perf_counter()
                try:
                    groups = self.engine.generate(
                        [ids for _, ids in chunk], self.sampling, should_stop=self._should_stop
                    )
                except GenerationInterrupted:
                    stopped = True  # the ranks decide together below: a rank that finished may wait in `_agree`
                    break
                timings["generate_s"] += time.perf_counter() - start
                for (record, _), group in zip(chunk, groups, strict=True):
                    scored = self._score(record, group)
                    if self.dynamic_sampling and len(set(scored.rewards)) == 1:
                        dropped += 1
                        continue
                    kept.append(scored)
            stopped = stopped or (self._should_stop is not None and self._should_stop())
            if not stopped:
                self._record_metrics(kept, dropped, rounds, timings)
            failed = not kept and not exhausted and not stopped
            ranks = self._agree(bool(kept), exhausted, failed, stopped)
            if any(r["stopped"] for r in ranks):
                self._positions = before  # the abandoned batch's prompts were not consumed
                raise interrupted("generation")
            if any(r["failed"] for r in ranks):
                where = "" if self._world == 1 else f" on rank {next(i for i, r in enumerate(ranks) if r['failed'])}"
                count = f"all {dropped} groups" if failed else "all groups"
                raise RuntimeError(
                    f"Dynamic sampling dropped {count} in max_generation_rounds={rounds_allowed}{where}: every "
                    "group's rewards were identical. Raise max_generation_rounds, use easier prompts or a larger "
                    "group_size, or set dynamic_sampling=False."
                )
            if all(r["has_batch"] for r in ranks):
                if self._step_fn is not None:
                    self._in_flight = (int(self._step_fn()), before)
                yield RolloutBatch.from_groups(
                    [g.rollouts for g in kept],
                    [g.rewards for g in kept],
                    pad_token_id=self.tokenizer.pad_token_id,
                    correct=[g.correct for g in kept],
                    mask_truncated=self.mask_truncated,
                )
            elif kept:
                log.warning(
                    "The pass over the prompt source ended on another rank; %d group(s) generated here are dropped so "
                    "that all ranks start the next pass together.", len(kept),
                )  # fmt: skip
            if any(r["exhausted"] for r in ranks) or not all(r["has_batch"] for r in ranks):
                # The pass ends for every rank at once (records left on other ranks are skipped this pass).
                self._epoch, self._consumed = pass_epoch + 1, 0
                self._positions = [(pass_epoch + 1, 0)] * self._world
                return

    def _agree(self, has_batch: bool, exhausted: bool, failed: bool, stopped: bool) -> list[dict[str, Any]]:
        """Every rank's position and batch status after building a batch (one all-gather under data parallelism);
        the positions become what the next checkpoint stores."""
        local = [self._epoch, self._consumed, int(has_batch), int(exhausted), int(failed), int(stopped)]
        rows = [local]
        trainer = self.trainer
        if self._world > 1 and trainer is not None and torch.distributed.is_initialized():
            tensor = torch.tensor(local, dtype=torch.long, device=trainer.strategy.root_device)
            rows = trainer.strategy.all_gather(tensor).reshape(self._world, len(local)).tolist()
        self._positions = [(int(r[0]), int(r[1])) for r in rows]
        keys = ("has_batch", "exhausted", "failed", "stopped")
        return [dict(zip(keys, map(bool, r[2:]), strict=True)) for r in rows]

    def _prompts(self) -> Iterator[tuple[PromptRecord, list[int]]]:
        """This rank's records of the current pass (every ``world_size``-th, from index ``rank``) with their token
        ids, skipping the ones a checkpoint says were consumed and dropping over-long ones; a finished pass starts
        the next epoch."""
        skip = self._consumed
        for index, record in enumerate(self.source):
            if index < skip or index % self._world != self._rank:
                continue
            self._consumed = index + 1
            if not record.prompt.strip():
                self.totals["dropped_empty_prompts"] += 1
                log.warning(
                    "Dropped record %d of the source: its prompt is empty (%d dropped so far).",
                    index, self.totals["dropped_empty_prompts"],
                )  # fmt: skip
                continue
            ids = self.prompt_ids(record)
            limit, why = self._longest_prompt()
            if limit is not None and len(ids) > limit:
                self.totals["dropped_long_prompts"] += 1
                log.warning(
                    "Dropped record %d of the source (%r): its prompt has %d tokens > %d (%s; %d dropped so far).",
                    index, record.task, len(ids), limit, why, self.totals["dropped_long_prompts"],
                )  # fmt: skip
                continue
            yield record, ids
        self._epoch += 1
        self._consumed = 0

    def _longest_prompt(self) -> tuple[int | None, str]:
        """The longest prompt this run can take: ``max_prompt_tokens`` and what the engine's context leaves beside
        ``max_new_tokens`` (vLLM rejects a longer request, which would stop the run; HF would generate past the
        positions the model was trained on)."""
        if self._prompt_limit is None:
            limits = [] if self.max_prompt_tokens is None else [(self.max_prompt_tokens, "max_prompt_tokens")]
            context = getattr(self.engine, "max_model_len", None)
            if context is not None:
                room = context - self.sampling.max_tokens
                if room < 1:
                    raise ValueError(
                        f"max_new_tokens={self.sampling.max_tokens} leaves no room for a prompt in the engine's "
                        f"{context}-token context; lower max_new_tokens or raise engine_options.max_model_len."
                    )
                limits.append((room, f"the engine's {context}-token context minus max_new_tokens"))
            self._prompt_limit = min(limits) if limits else (None, "")
        return self._prompt_limit

    def sync_weights(self, force: bool = False) -> None:
        """Push the policy's weights into the engine if ``sync_every_n_steps`` optimizer steps passed since the last
        push (the first call always pushes: the engine started from ``model``, not from the policy); with ``force``,
        whenever any step did (held-out scoring must see the current weights).

        Call it before the step's rollouts are pulled, outside any forward pass: gathering sharded weights is a
        collective that FSDP1 refuses inside a forward (and a LightningModule that FSDP wraps runs ``training_step``
        inside one). The RL module calls it in ``on_train_batch_start``; every rank must call it, even one with no
        prompts left.
        """
        if self._policy is None or self._step_fn is None:
            return
        step = int(self._step_fn())
        every = 1 if force else self.sync_every_n_steps
        if self._synced_step is not None and step - self._synced_step < every:
            return
        if self._synced_step is None:  # the first sync: the engine must run the trainer's model, not another one
            check_same_positions(getattr(self._policy, "config", None), getattr(self.engine, "model_config", None))
        start = time.perf_counter()
        self.engine.load_weights(full_named_parameters(self._policy))
        self._synced_step = step
        self.totals["weight_syncs"] += 1
        self._sync_seconds += time.perf_counter() - start

    def _score(self, record: PromptRecord, group: list[Rollout]) -> _ScoredGroup:
        texts = [self.tokenizer.decode(r.completion_ids, skip_special_tokens=True) for r in group]
        rewards, correct = self.rewards(record, texts, [len(r.completion_ids) for r in group])
        return _ScoredGroup(group, rewards, correct)

    def _record_metrics(self, kept: list[_ScoredGroup], dropped: int, rounds: int, timings: dict[str, float]) -> None:
        self.totals["dropped_groups"] += dropped
        self.totals["generation_rounds"] += rounds
        if dropped:
            log.info(
                "Dynamic sampling dropped %d zero-variance groups in %d generation rounds, kept %d (%d dropped in "
                "total).", dropped, rounds, len(kept), self.totals["dropped_groups"],
            )  # fmt: skip
        self.metrics = {
            "rollout/groups": float(len(kept)),
            "rollout/dropped_groups": float(dropped),
            "rollout/generation_rounds": float(rounds),
            "rollout/reward_failures_total": float(self.rewards.failures),
            **{f"rollout/{k}": v for k, v in timings.items()},
            **{f"rollout/{k}_total": float(v) for k, v in self.totals.items()},
        }
        trainer = self.trainer
        if trainer is not None:
            for logger in trainer.loggers:
                logger.log_metrics(self.metrics, step=trainer.global_step)


class _Stream(IterableDataset):
    """The items of a generator function, made when iterated: training batches or scored held-out records, each
    generated by the engine in this process with the weights of that moment."""

    def __init__(self, items: Callable[[], Iterator[Any]]) -> None:
        self._items = items

    def __iter__(self) -> Iterator[Any]:
        return self._items()


def _loader(items: Callable[[], Iterator[Any]]) -> DataLoader:
    """No workers and no batching: the engine lives in this process, and each item already is a whole batch."""
    return DataLoader(_Stream(items), batch_size=None, num_workers=0, collate_fn=_identity)


def _source_id(source: Any, first: PromptRecord) -> str:
    """Names a prompt stream by its kind and its first record, which any change of data, task or length changes."""
    digest = hashlib.sha256(f"{first.task}\0{first.prompt}\0{first.answers}".encode()).hexdigest()[:12]
    return f"{type(source).__name__}({first.task}, first record {digest})"


def _identity(batch: Any) -> Any:
    return batch
