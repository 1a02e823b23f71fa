"""Helpers for the CLI tests: a tiny saved model, a run config, a verification callback and a logging reward.

The CLI runs in subprocesses (Lightning's ``ddp`` launcher re-executes the command for rank 1), so what those
processes need lives here and is named by import path in the config (``tests.helpers.cli...``): the
subprocesses run with the repository root on ``PYTHONPATH``. Both talk back through files in ``$LONGACT_TEST_OUT``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import yaml
from lightning.pytorch.strategies import FSDPStrategy

from longact_lightning.data.records import PromptRecord
from longact_lightning.saliency.projections import clean_name

OUT_ENV = "LONGACT_TEST_OUT"
FLAT_RANK_ENV = "LONGACT_TEST_FLAT_RANK"
FLAT_EVERY_ENV = "LONGACT_TEST_FLAT_EVERY"
SLEEP_ENV = "LONGACT_TEST_STEP_SLEEP"
PASS_SLEEP_ENV = "LONGACT_TEST_PASS_SLEEP"
FAIL_RANK_ENV = "LONGACT_TEST_FAIL_RANK"
ROOT = Path(__file__).resolve().parents[2]


def make_tiny_model_dir(path: Path, seed: int = 0, hidden_size: int = 64) -> Path:
    """A 2-layer random Llama-GQA (4 query, 2 key/value heads) with the embedded SmolLM2 tokenizer, saved in HF
    format: loads in milliseconds, and every config's tokenizer-dependent part (chat template, RULER sizing) still
    works. vLLM's CPU attention needs a head size of at least 32: ``hidden_size=128``."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from longact_lightning.models import load_tokenizer

    if (path / "config.json").is_file():
        return path
    tokenizer = load_tokenizer("smollm2-135m-instruct")
    config = LlamaConfig(
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_run_config(path: Path, model_dir: Path, out: Path, **overrides: Any) -> Path:
    """A small CPU run of the real CLI: tiny model, RULER niah_single_1 at 512 tokens, HF engine, G=2, 2 prompts per
    step, 8 new tokens, LongAct at 0.3, a checkpoint every step. ``overrides`` take dotted keys
    (``trainer.max_steps``)."""
    config: dict[str, Any] = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "precision": "32-true",
            "max_steps": 3,
            "log_every_n_steps": 1,
            "default_root_dir": str(out),
            "logger": [
                {
                    "class_path": "lightning.pytorch.loggers.CSVLogger",
                    "init_args": {"save_dir": str(out), "name": "logs", "version": ""},
                }
            ],
            "callbacks": [{"class_path": "tests.helpers.cli.RunRecorder"}],
        },
        "longact": {"top_ratio": 0.3, "mode": "high"},
        "checkpoint": {"dirpath": str(out / "checkpoints"), "every_n_train_steps": 1},
        "model": {
            "model": str(model_dir),
            "loss": {"loss_type": "dapo"},
            "lr": 1e-2,  # large, so that trainable rows visibly move in a few steps
            "weight_decay": 0.1,  # decoupled decay: frozen rows must not shrink either
            "micro_batch_size": 4,
            "max_grad_norm": 1.0,
        },
        "data": {
            "source": {
                "class_path": "longact_lightning.data.ruler.RulerSource",
                "init_args": {"task": "niah_single_1", "target_length": 512, "num_samples": 64, "seed": 0},
            },
            "engine": "hf",
            "engine_options": {"dtype": "float32", "max_batch_sequences": 8},
            "group_size": 2,
            "prompts_per_step": 2,
            "max_new_tokens": 8,
            "dynamic_sampling": False,
            "reward": "tests.helpers.cli:logged_reward",
        },
    }
    for dotted, value in overrides.items():
        node = config
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


class CPUFSDPStrategy(FSDPStrategy):
    """Lightning's ``FSDPStrategy`` (FSDP1) on CPU/gloo, for tests only.

    Lightning 2.6.6 does not run ``FSDPStrategy`` on CPU, twice over: the accelerator connector raises "The strategy
    `fsdp` requires a GPU accelerator" (it checks ``type(strategy) is FSDPStrategy``, so a subclass passes), and
    ``_setup_model`` passes ``device_id=root_device.index`` (None on CPU), for which torch's FSDP1 raises "FSDP needs a
    non-CPU accelerator device". torch's FSDP1 itself runs on CPU/gloo given ``device_id=torch.device("cpu")``, which
    this subclass passes when Lightning wraps the model; a model already wrapped (``RLPolicyModule`` wraps its policy
    in ``configure_model``) goes through Lightning's own code. Everything else (auto-wrapping, mixed precision,
    checkpointing) is Lightning's, so the tests exercise the FSDP1 storage GPU users get (``use_orig_params`` flat
    shards)."""

    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel

        if any(isinstance(module, FullyShardedDataParallel) for module in model.modules()):
            return super()._setup_model(model)
        return FullyShardedDataParallel(
            module=model, cpu_offload=self.cpu_offload, mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy, device_id=torch.device("cpu"), **self.kwargs,
        )  # fmt: skip


def full_policy_state(trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, torch.Tensor]:
    """Every parameter of the module as a full tensor (a collective under FSDP: call it on every rank), gathered
    without the library's streaming gather: FSDP1 summons the whole root at once, FSDP2 ``full_tensor()``s."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    root = next((m for m in trainer.strategy.model.modules() if isinstance(m, FullyShardedDataParallel)), None)
    if root is not None:
        with FullyShardedDataParallel.summon_full_params(root, writeback=False, rank0_only=False):
            return {clean_name(n): p.detach().clone() for n, p in pl_module.named_parameters()}
    state = {}
    for name, param in pl_module.named_parameters():
        data = param.detach()
        state[clean_name(name)] = (data.full_tensor() if hasattr(data, "full_tensor") else data).clone()
    return state


def reference_logprobs(config: Any, state: dict[str, torch.Tensor], sequences: list[list[int]], start: int) -> list:
    """Log-probs of tokens ``start:`` of each sequence under a fresh fp32 HF model holding ``state`` (HF names):
    full logits, no packing, no KV sharing: the plain definition the engine and the trainer must both meet."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    rows = []
    with torch.no_grad():
        for ids in sequences:
            logits = model(input_ids=torch.tensor([ids])).logits[0].float()
            logp = torch.log_softmax(logits[start - 1 : -1], dim=-1)
            rows.append(logp.gather(-1, torch.tensor(ids[start:])[:, None])[:, 0].tolist())
    return rows


def engine_logprobs(engine: Any, sequences: list[list[int]], start: int) -> list:
    """The vLLM engine's log-probs of tokens ``start:`` of each sequence (``prompt_logprobs``)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    requests = [TokensPrompt(prompt_token_ids=ids) for ids in sequences]
    outputs = engine.llm.generate(requests, SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)
    return [
        [float(out.prompt_logprobs[i][ids[i]].logprob) for i in range(start, len(ids))]
        for ids, out in zip(sequences, outputs, strict=True)
    ]


def run_worker_ranks(module: str, args: list[str], out: Path, world: int = 2, timeout: float = 300) -> None:
    """Run ``python -m module RANK PORT *args`` as ``world`` processes that rendezvous on a free local port; fail
    with every rank's stderr tail unless all exit 0."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", module, str(rank), port, *args],
            cwd=ROOT,
            env=subprocess_env(out),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for rank in range(world)
    ]
    errors = [proc.communicate(timeout=timeout)[1] for proc in procs]
    assert all(proc.returncode == 0 for proc in procs), "\n----\n".join(e[-3000:] for e in errors)


def subprocess_env(out: Path, **extra: str) -> dict[str, str]:
    """The environment of a CLI subprocess: repository root importable, 1 thread, no inherited DDP variables."""
    drop = ("LOCAL_RANK", "NODE_RANK", "GLOBAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONWARNINGS="ignore",
        COLUMNS="200",
        **{OUT_ENV: str(out)},
        **extra,
    )
    return env


def _rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


def index_score(completion: str, record: PromptRecord) -> float:
    """A held-out metric whose value is known by hand, whatever the model: 1 for every third record of the source."""
    return float(record.metadata["index"] % 3 == 0)


_CALLS = [0]


def logged_reward(completion: str, record: PromptRecord) -> float:
    """A reward with signal on any model — 0, 1, 0, 1, ... over its calls, so every group of an even size has
    variance — that logs which record it scored and on which rank, to ``$LONGACT_TEST_OUT/prompts_rank{r}.jsonl``.

    On rank ``$LONGACT_TEST_FLAT_RANK`` it is constant for every ``$LONGACT_TEST_FLAT_EVERY``-th of the rank's records
    (default: all of them), so dynamic sampling drops those groups there."""
    out = os.environ.get(OUT_ENV)
    if out:
        line = {"rank": _rank(), "index": record.metadata.get("index"), "pid": os.getpid()}
        with open(Path(out) / f"prompts_rank{_rank()}.jsonl", "a", encoding="utf-8") as handle:
            handle.write(json.dumps(line) + "\n")
    if os.environ.get(FLAT_RANK_ENV) == str(_rank()):
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        if (record.metadata["index"] // world) % int(os.environ.get(FLAT_EVERY_ENV, "1")) == 0:
            return 0.0
    _CALLS[0] += 1
    return float(_CALLS[0] % 2)


class RunRecorder(pl.Callback):
    """Records what the tests check, per rank, into ``$LONGACT_TEST_OUT``:

    * ``progress_rank{r}.json`` after every step (global step, pid), so a test knows when to signal, and
      ``phase_rank{r}.json`` when a step's generation and its first scoring/update pass start;
    * after every weight sync into a vLLM engine, the engine's log-probs of fixed sequences against those of the full
      (gathered) policy, and the engine's ``(rank, local_rank)``;
    * ``batch_rank{r}_step{s}.pt``: the first step's rollout batch, and each step's logged gradient norm;
    * ``rank{r}.json`` at the end of fit: the global step at train start and end, the DataModule's state and rank,
      and the frozen-row verdict: every Q/K row the LongAct mask leaves frozen is bit-identical at the end to its
      value at train start *and* to the untouched model directory on disk (so it held across a kill and resume),
      some selected row moved, and non-Q/K weights moved — all on the full, gathered weights;
    * ``rank{r}.pt``: the LongAct row masks at train start (after any checkpoint restore) and at the end, and the
      final full weights (to compare ranks and the export).

    ``$LONGACT_TEST_STEP_SLEEP`` seconds of sleep after each step pace a run for the signal tests;
    ``$LONGACT_TEST_FAIL_RANK`` makes that rank alone raise after step 2; ``$LONGACT_TEST_PASS_SLEEP`` seconds of sleep
    in every scoring/update pass make the update phase long enough to signal inside it.
    """

    SEQUENCES_START = 6  # fixed sequences: 6 prompt tokens, then 10 scored ones

    def __init__(self) -> None:
        self.out = Path(os.environ[OUT_ENV])
        self.sleep = float(os.environ.get(SLEEP_ENV, "0"))
        self.start_step = -1
        self.steps: list[int] = []
        self.grad_norms: list[float] = []
        self.sync_checks: list[dict[str, Any]] = []
        self.engine_workers: list[list[int]] = []
        self.start_params: dict[str, torch.Tensor] = {}
        self.start_masks: dict[str, torch.Tensor] = {}
        self._phase: dict[str, Any] = {}

    @staticmethod
    def _longact(trainer: pl.Trainer):
        from longact_lightning.callbacks import LongAct

        return next(cb for cb in trainer.callbacks if isinstance(cb, LongAct))

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        datamodule = trainer.datamodule
        sync = datamodule.sync_weights

        def sync_then_check(*args: Any, **kwargs: Any) -> None:
            before = datamodule.totals["weight_syncs"]
            sync(*args, **kwargs)
            if datamodule.totals["weight_syncs"] > before and hasattr(datamodule.engine, "llm"):
                self._check_engine(trainer, pl_module, datamodule.engine)

        datamodule.sync_weights = sync_then_check
        logprobs, pass_sleep = pl_module._logprobs, float(os.environ.get(PASS_SLEEP_ENV, "0"))

        def marked_logprobs(*args: Any, **kwargs: Any) -> Any:
            self._mark_phase(trainer, "update")
            time.sleep(pass_sleep)
            return logprobs(*args, **kwargs)

        pl_module._logprobs = marked_logprobs

    def _mark_phase(self, trainer: pl.Trainer, phase: str) -> None:
        marker = {"phase": phase, "global_step": trainer.global_step, "time": time.time()}
        if marker["phase"] != self._phase.get("phase") or marker["global_step"] != self._phase.get("global_step"):
            (self.out / f"phase_rank{trainer.global_rank}.json").write_text(json.dumps(marker))
            self._phase = marker

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        self._mark_phase(trainer, "generation")  # the module's training_step pulls (generates) its batch next

    def _check_engine(self, trainer: pl.Trainer, pl_module: pl.LightningModule, engine: Any) -> None:
        state = {k.removeprefix("policy."): v for k, v in full_policy_state(trainer, pl_module).items()}
        vocab = pl_module.policy.config.vocab_size
        g = torch.Generator().manual_seed(7)
        sequences = [torch.randint(10, vocab, (16,), generator=g).tolist() for _ in range(2)]
        expected = reference_logprobs(pl_module.policy.config, state, sequences, self.SEQUENCES_START)
        served = engine_logprobs(engine, sequences, self.SEQUENCES_START)
        diff = max(abs(a - b) for row_e, row_s in zip(expected, served) for a, b in zip(row_e, row_s))
        self.sync_checks.append({"step": trainer.global_step, "max_abs_diff": diff})
        if not self.engine_workers:
            self.engine_workers = [list(r) for r in engine.worker_ranks()]

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start_step = trainer.global_step
        self.start_params = full_policy_state(trainer, pl_module)
        self.start_masks = {k: v.clone() for k, v in self._longact(trainer).row_mask.masks.items()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps.append(trainer.global_step)
        norm = trainer.callback_metrics.get("train/grad_norm")
        self.grad_norms.append(float(norm) if norm is not None else float("nan"))
        if len(self.steps) == 1:
            torch.save(batch, self.out / f"batch_rank{trainer.global_rank}_step{self.start_step}.pt")
        if os.environ.get(FAIL_RANK_ENV) == str(trainer.global_rank) and trainer.global_step == 2:
            raise RuntimeError(f"injected failure on rank {trainer.global_rank}")
        progress = {"global_step": trainer.global_step, "pid": os.getpid(), "time": time.time()}
        (self.out / f"progress_rank{trainer.global_rank}.json").write_text(json.dumps(progress))
        if self.sleep:
            time.sleep(self.sleep)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        rank = trainer.global_rank
        longact = self._longact(trainer)
        masks = {k: v.clone() for k, v in longact.row_mask.masks.items()}
        final = full_policy_state(trainer, pl_module)
        disk = _disk_weights(pl_module)
        failures: list[str] = []
        if not masks:
            failures.append("LongAct selected no masks")
        selected = frozen = 0
        for name, mask in masks.items():
            now, start, init = final[name], self.start_params[name], disk[name]
            frozen_rows = ~mask
            selected += int(mask.sum())
            frozen += int(frozen_rows.sum())
            if not torch.equal(now[frozen_rows], start[frozen_rows]):
                failures.append(f"{name}: frozen rows changed since train start")
            if not torch.equal(now[frozen_rows], init[frozen_rows]):
                failures.append(f"{name}: frozen rows differ from the initial model on disk")
            if mask.any() and torch.equal(now[mask], init[mask]):
                failures.append(f"{name}: no selected row moved")
        others = [n for n in final if n not in masks and n.endswith("v_proj.weight")]
        if not others or any(torch.equal(final[n], disk[n]) for n in others):
            failures.append(f"v_proj weights did not move: {others}")
        for check in self.sync_checks:
            if not check["max_abs_diff"] <= 1e-3:
                failures.append(f"engine log-probs differ from the policy's after the sync at step {check['step']}")
        datamodule = trainer.datamodule
        engine = datamodule._engine
        verdict = {
            "rank": rank,
            "world_size": trainer.world_size,
            "strategy": type(trainer.strategy).__name__,
            "start_step": self.start_step,
            "steps": self.steps,
            "global_step": trainer.global_step,
            "grad_norms": self.grad_norms,
            "sync_checks": self.sync_checks,
            "engine_workers": self.engine_workers,
            "engine_placement": dataclasses.asdict(engine.placement) if hasattr(engine, "placement") else None,
            "datamodule_rank": [datamodule._rank, datamodule._world],
            "datamodule_state": datamodule.state_dict(),
            "sampling_seed": datamodule.sampling.seed,
            "saliency_tokens": sorted({float(stats.count) for stats in longact.stats.values()}),
            "masked_params": len(masks),
            "selected_rows": selected,
            "frozen_rows": frozen,
            "failures": failures,
            "ok": not failures,
        }
        (self.out / f"rank{rank}.json").write_text(json.dumps(verdict, indent=1))
        torch.save({"start_masks": self.start_masks, "end_masks": masks, "final": final}, self.out / f"rank{rank}.pt")


def _disk_weights(pl_module: pl.LightningModule) -> dict[str, torch.Tensor]:
    """The weights of the model directory the run started from, under the LightningModule's parameter names."""
    from safetensors.torch import load_file

    directory = Path(pl_module.hparams.model)
    state = {}
    for file in sorted(directory.glob("*.safetensors")):
        state.update(load_file(file))
    weights = {}
    for name, _ in pl_module.named_parameters():
        name = clean_name(name)
        hf_name = name.removeprefix("policy.")
        if hf_name in state:
            weights[name] = state[hf_name]
    return weights


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class ReplayBatches(pl.LightningDataModule):
    """Serves given rollout batches, in order: a run on data recorded from another run."""

    def __init__(self, batches: list[Any]) -> None:
        super().__init__()
        self.batches = batches

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(self.batches, batch_size=None, collate_fn=lambda batch: batch)


def merge_batches(batches: list[Any]) -> Any:
    """One ``RolloutBatch`` holding the groups of several (each rank's), re-padded: what one process would train on
    if it had generated all of them."""
    from longact_lightning.rollout import RolloutBatch

    return RolloutBatch.concat(batches)
