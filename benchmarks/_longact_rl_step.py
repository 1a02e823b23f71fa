"""This project's side of the TRL comparison: one process, the reference workload, per-step wall clock + peak RSS.

Run by ``benchmarks/rl_step_vs_trl.py`` and ``benchmarks/step_breakdown.py`` (through :func:`run`); prints one
JSON line with per-step wall clock, the time spent producing the rollout batch (of it: generating) and, just before,
pushing the policy's weights into the engine, the tokens and model FLOPs the trainer processed (one entry per step), the
resident set and glibc heap after each step, and peak RSS.
It measures through public extension points only, so what it times is the package as users run it: generation and
weight-sync seconds are the ``rollout/generate_s`` / ``rollout/sync_s`` metrics the data module already reports for
each batch (read by :class:`StepClock`), and a data-module subclass (:class:`MeasuredRolloutDataModule`) times and
counts each batch as the RL module pulls it.
The workload is ``benchmarks/_workload.py`` (the same prompts TRL's side sees), LongAct on (top 30 %).
"""

from __future__ import annotations

import argparse
import inspect
import json
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from benchmarks._heap import heap_mb
from benchmarks._workload import (
    DEFAULT_REPEATS,
    GROUP_SIZE,
    LEARNING_RATE,
    MAX_NEW_TOKENS,
    OTHER_TOKENS,
    PROMPTS_PER_STEP,
    TOKENS_PER_REPEAT,
    prompts,
)
from longact_lightning.callbacks import HostMemoryReuse, LongAct
from longact_lightning.data.datamodule import RolloutDataModule
from longact_lightning.data.records import PromptRecord
from longact_lightning.models import EMBEDDED_MODEL
from longact_lightning.rl.losses import LossConfig
from longact_lightning.rl.module import RLPolicyModule
from longact_lightning.rollout.batch import RolloutBatch

# Sequences per forward/backward pass: one group at a time, for peak memory. More groups per pass form every weight
# gradient, the lm_head product and the tied embedding's [vocab, hidden] gradient less often: in bf16 two groups per
# pass make the train phase ~6 % faster, but put peak RSS at 0.73x of TRL's lowest bf16 reading (8.9 of 8.9-10.4 GB).
MICRO_BATCH_SIZE = 4
# The engine's KV cache, sized to the workload: 4 prompts x (~530 + 4 x 32) tokens with the prompts prefix-cached
# need ~0.1 GiB in fp32 and half that in bf16; each gets about twice its need.
KV_CACHE_GIB = {"fp32": 0.25, "bf16": 0.125}
SMOLLM2_CONTEXT = 8192
# The module's default, so a run without --pad-to-multiple-of measures what users get.
PAD_TO_MULTIPLE_OF = inspect.signature(RLPolicyModule).parameters["pad_to_multiple_of"].default


def run(steps: int, bf16: bool, extra: list[str] | None = None, reference_workload: bool = True) -> dict:
    """How the comparison scripts run this side: a fresh process (its peak RSS is its own), in fp32 or bf16-mixed,
    with ``steps`` steps in all; returns its JSON line. ``reference_workload`` pins the ~500-token workload's
    micro-batch and KV cache sizes; without it ``extra`` chooses (the cache then defaults to twice the need)."""
    precision = ["--precision", "bf16-mixed", "--engine-dtype", "bfloat16"] if bf16 else []
    name = "bf16" if bf16 else "fp32"
    pinned = ["--micro-batch-size", str(MICRO_BATCH_SIZE), "--kv-cache-gib", str(KV_CACHE_GIB[name])]
    cmd = [sys.executable, "-m", "benchmarks._longact_rl_step", "--steps", str(steps), *precision,
           *(pinned if reference_workload else []), *(extra or [])]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=Path(__file__).parents[1]).stdout
    return json.loads([line for line in out.splitlines() if line.startswith("{")][-1])


def workload_records(count: int, repeats: int) -> list[PromptRecord]:
    """The workload's prompts (same generator, same seed as TRL's side), as PromptRecords scored by substring match."""
    return [PromptRecord(prompt=p["prompt"], answers=(p["answer"],), task="needle") for p in prompts(count, repeats)]


class StepClock(Callback):
    """Wall clock of each step, the seconds its rollout batch spent generating and syncing weights, and the process's
    resident memory and heap after it (Linux ``/proc``, glibc).

    The two rollout times are the data module's own per-batch metrics (``RolloutDataModule.metrics``, which it also
    logs): the batch a step trained on is the last one it produced, so at the step's end they are that batch's.
    """

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self.generate_s: list[float] = []
        self.sync_s: list[float] = []
        self.rss_mb: list[int] = []
        self.heap_mb: list[tuple[int, int] | None] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seconds.append(time.perf_counter() - self._start)
        metrics = trainer.datamodule.metrics
        self.generate_s.append(metrics["rollout/generate_s"])
        self.sync_s.append(metrics["rollout/sync_s"])
        resident_pages = int(Path("/proc/self/statm").read_text().split()[1])
        self.rss_mb.append(resident_pages * resource.getpagesize() >> 20)
        self.heap_mb.append(heap_mb())


def model_flops(config, prompt_length: int, completion_lengths: list[int]) -> tuple[float, float]:
    """Forward + backward FLOPs of one group as the trainer scores it, counting useful work only: (linear layers,
    attention).

    The shared prompt runs once (its last token leads the completions), every real completion token once; linear
    layers cost 6 FLOPs per weight per token, ``lm_head`` only on completion tokens, and causal attention 12 FLOPs per
    query-key pair per hidden channel (QK^T and PV, forward + backward), masked-out pairs not counted.
    """
    d, layers = config.hidden_size, config.num_hidden_layers
    kv = config.num_key_value_heads * (d // config.num_attention_heads)
    per_layer = 2 * d * d + 2 * d * kv + 3 * d * config.intermediate_size  # q, o, k, v, gate/up/down
    shared = prompt_length - 1
    completion = sum(completion_lengths)
    linear = 6 * (layers * per_layer * (shared + completion) + config.vocab_size * d * completion)
    pairs = shared * (shared + 1) / 2 + sum(n * shared + n * (n + 1) / 2 for n in completion_lengths)
    return linear, 12 * d * layers * pairs


def batch_work(config, batch: RolloutBatch) -> tuple[float, float, float]:
    """Tokens, model FLOPs and, of them, attention FLOPs of the gradient pass over ``batch``: :func:`model_flops` of
    each group from its real prompt and completion lengths, so the count is the same whichever way the module splits
    the batch into micro-batches."""
    P = batch.prompt_length
    prompt, completion = batch.attention_mask[:, :P].sum(-1), batch.attention_mask[:, P:].sum(-1)  # [B]
    tokens = flops = attention = 0.0
    for group in batch.group_ids.unique():
        rows = (batch.group_ids == group).nonzero().squeeze(1)
        lengths = completion[rows].tolist()
        tokens += int(prompt[rows[0]]) - 1 + sum(lengths)
        linear_flops, attention_flops = model_flops(config, int(prompt[rows[0]]), lengths)
        flops += linear_flops + attention_flops
        attention += attention_flops
    return tokens, flops, attention


class _MeasuredBatches:
    """The batches of ``loader``, each handed to ``measure`` with the seconds its ``next`` took before it is yielded.

    An iterable rather than a generator, so that every pass (epoch) Lightning starts with ``iter()`` is a fresh one,
    as with the DataLoader it wraps.
    """

    def __init__(self, loader: Iterable[RolloutBatch], measure: Callable[[RolloutBatch, float], None]) -> None:
        self.loader = loader
        self.measure = measure

    def __iter__(self) -> Iterator[RolloutBatch]:
        # The loader's iterator is made here, when Lightning starts the pass, not lazily at the first batch: making a
        # DataLoader iterator draws from torch's global generator, which the colocated engine samples from on CPU, so
        # drawing later (after the engine is built and seeded) would change the rollouts of a seeded run.
        return self._measured(iter(self.loader))

    def _measured(self, batches: Iterator[RolloutBatch]) -> Iterator[RolloutBatch]:
        while True:
            start = time.perf_counter()
            batch = next(batches, None)
            if batch is None:
                return
            self.measure(batch, time.perf_counter() - start)
            yield batch


class MeasuredRolloutDataModule(RolloutDataModule):
    """:class:`RolloutDataModule` whose training loader times and counts each batch as the RL module pulls it.

    The module pulls its batch inside ``training_step`` (``next(dataloader_iter)``) and the rollouts are generated
    right then, so the time of that ``next`` is the step's rollout time (``rollout_s``; the weight sync runs before it,
    in ``on_train_batch_start``). The module here trains each batch exactly once (``ppo_epochs=1``), so a batch's
    :func:`batch_work` is its step's (``train_tokens``, ``train_flops``, ``attention_flops``). All four lists are in
    ``measured``, one entry per batch.

    Args:
        config: the policy's model config, for :func:`model_flops`.
        after_batch: called with each batch's 0-based index once it is generated and counted, just before the module
            gets it: where a capture of the step's train phase starts (:class:`TrainPhaseProfile`).
        **kwargs: :class:`RolloutDataModule`'s.
    """

    def __init__(self, config, after_batch: Callable[[int], None] | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.config = config
        self.after_batch = after_batch
        self.measured: dict[str, list[float]] = {
            "rollout_s": [], "train_tokens": [], "train_flops": [], "attention_flops": []
        }  # fmt: skip

    def train_dataloader(self) -> Iterable[RolloutBatch]:
        return _MeasuredBatches(super().train_dataloader(), self._measure)

    def _measure(self, batch: RolloutBatch, seconds: float) -> None:
        index = len(self.measured["rollout_s"])
        tokens, flops, attention = batch_work(self.config, batch)
        for key, value in zip(self.measured, (seconds, tokens, flops, attention), strict=True):
            self.measured[key].append(value)
        if self.after_batch is not None:
            self.after_batch(index)


# Operator families of the train-phase profile (``--profile-step``), matched against ATen op names in this order.
_OP_FAMILIES = {
    "matmul": ("aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm"),
    "attention": ("scaled_dot_product",),
    "copy, cast, fill": ("aten::copy_", "aten::fill_", "aten::zero_", "aten::cat", "aten::index", "aten::_index_put"),
    "optimizer": ("adamw",),
}


def operator_family_seconds(profiler: torch.profiler.profile) -> dict[str, float]:
    """Self time of the profiled ATen operators, summed per family of :data:`_OP_FAMILIES` (the rest: ``other ops``)."""
    seconds = dict.fromkeys((*_OP_FAMILIES, "other ops"), 0.0)
    for event in profiler.key_averages():
        if event.self_cpu_time_total <= 0 or not event.key.startswith("aten::"):
            continue
        family = next((f for f, keys in _OP_FAMILIES.items() if any(k in event.key for k in keys)), "other ops")
        seconds[family] += event.self_cpu_time_total / 1e6
    return seconds


class TrainPhaseProfile(Callback):
    """Torch-profiler capture of one step's train phase (``--profile-step``, 0-based), stored in ``result`` as its wall
    time and each operator family's self time.

    The capture starts when the data module hands over that step's batch (:meth:`batch_ready`, its ``after_batch``),
    so the rollout, which is the engine's time, stays outside it; it ends when the step does. Register this callback
    before the others, so their end-of-step work stays outside too.
    """

    def __init__(self, step: int) -> None:
        self.step = step
        self.result: dict | None = None
        self._profiler: torch.profiler.profile | None = None
        self._start = 0.0

    def batch_ready(self, index: int) -> None:
        if index == self.step:
            self._start = time.perf_counter()
            self._profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            self._profiler.start()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._profiler is None:
            return
        self._profiler.stop()
        wall = time.perf_counter() - self._start
        self.result = {"wall_s": wall, "self_s": operator_family_seconds(self._profiler)}
        self._profiler = None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--precision", default="32-true", help="Lightning precision, e.g. 32-true or bf16-mixed")
    ap.add_argument("--engine-dtype", default="float32")
    ap.add_argument("--no-longact", action="store_true")
    ap.add_argument(
        "--no-host-memory-reuse", action="store_true", help="leave glibc malloc's defaults (see HostMemoryReuse)"
    )
    ap.add_argument("--host-memory-release-every", type=int, default=1, help="HostMemoryReuse(release_every_n_steps=)")
    ap.add_argument("--host-memory-own-pages-from-mb", type=int, help="HostMemoryReuse(own_pages_from_mb=)")
    ap.add_argument("--micro-batch-size", type=int, default=4, help="sequences per forward/backward (4 = one group)")
    ap.add_argument(
        "--pad-to-multiple-of", type=int, default=PAD_TO_MULTIPLE_OF, help="RLPolicyModule(pad_to_multiple_of=)"
    )
    ap.add_argument("--kv-cache-gib", type=float, help="the engine's KV cache (default: twice the step's need)")
    ap.add_argument("--repeats", type=int, default=DEFAULT_REPEATS, help="noise repeats per prompt (prompt length)")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--no-share-prompt", action="store_true", help="score every sequence whole (prompt G times)")
    ap.add_argument("--max-tokens-per-micro-batch", type=int, help="RLPolicyModule(max_tokens_per_micro_batch=)")
    ap.add_argument("--profile-step", type=int, help="profile this training step (0-based) with the torch profiler")
    args = ap.parse_args()

    pl.seed_everything(0)
    module = RLPolicyModule(
        model=EMBEDDED_MODEL, loss=LossConfig(loss_type="dapo"), lr=LEARNING_RATE,
        micro_batch_size=args.micro_batch_size, max_tokens_per_micro_batch=args.max_tokens_per_micro_batch,
        max_grad_norm=1.0,
        pad_to_multiple_of=args.pad_to_multiple_of, gradient_checkpointing=args.gradient_checkpointing,
        share_prompt=not args.no_share_prompt,
    )  # fmt: skip
    prompt_tokens = OTHER_TOKENS + TOKENS_PER_REPEAT * args.repeats
    max_model_len = min(SMOLLM2_CONTEXT, max(1024, prompt_tokens + MAX_NEW_TOKENS + 64))
    # twice what the step's sequences need (prompts prefix-cached): 30 layers x K/V x 3 heads x 64 channels per token
    kv_bytes = PROMPTS_PER_STEP * (prompt_tokens + GROUP_SIZE * MAX_NEW_TOKENS) * 30 * 2 * 3 * 64
    kv_cache_gib = args.kv_cache_gib or 2 * kv_bytes * (2 if args.engine_dtype == "bfloat16" else 4) / 2**30
    profile = TrainPhaseProfile(args.profile_step) if args.profile_step is not None else None
    data = MeasuredRolloutDataModule(
        config=module.policy.config,
        after_batch=profile.batch_ready if profile is not None else None,
        source=workload_records(64, args.repeats),
        model=EMBEDDED_MODEL,
        engine="vllm",
        engine_options={
            "dtype": args.engine_dtype,
            "max_model_len": max_model_len,
            "kv_cache_gib": kv_cache_gib,
            # sized to the 16 sequences of a step: vLLM's CPU defaults preallocate for 256 sequences
            "engine_kwargs": {"max_num_seqs": 16, "max_num_batched_tokens": max(2048, max_model_len)},
        },
        group_size=GROUP_SIZE,
        prompts_per_step=PROMPTS_PER_STEP,
        max_new_tokens=MAX_NEW_TOKENS,
        reward="contains_match",
    )
    clock = StepClock()
    # as the CLI runs it: HostMemoryReuse is one of its default callbacks
    reuse = HostMemoryReuse(
        not args.no_host_memory_reuse, args.host_memory_release_every, args.host_memory_own_pages_from_mb
    )
    # the profile first, so that its capture ends before the other callbacks' end-of-step work
    callbacks = [] if profile is None else [profile]
    callbacks += [clock, reuse]
    callbacks += [] if args.no_longact else [LongAct(top_ratio=0.3)]
    trainer = pl.Trainer(
        max_steps=args.steps,
        accelerator="cpu",
        devices=1,
        precision=args.precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    trainer.fit(module, datamodule=data)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    measured = data.measured
    record = {"rollout_s": measured["rollout_s"], "generate_s": clock.generate_s, "sync_s": clock.sync_s,
              **{key: measured[key] for key in ("train_tokens", "train_flops", "attention_flops")}}  # fmt: skip
    if profile is not None and profile.result is not None:
        record["profile"] = profile.result
    print(
        json.dumps(
            {
                "step_s": clock.seconds,
                "rss_mb": clock.rss_mb,
                "heap_mb": clock.heap_mb,
                "peak_rss_mb": round(rss),
                **record,
            }
        )
    )


if __name__ == "__main__":
    main()
