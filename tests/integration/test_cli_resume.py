"""Crash safety of ``longact fit``: SIGKILL after a checkpoint, then ``--ckpt_path last``; and SIGTERM mid-run.

Each run is the real CLI in a subprocess (tiny saved model, RULER prompts, HF engine, LongAct at 0.3, a checkpoint
every step). :class:`tests.helpers.cli.RunRecorder` paces the steps (``$LONGACT_TEST_STEP_SLEEP``),
reports progress and writes the end-of-run verdict; :func:`tests.helpers.cli.logged_reward` logs the
RULER index of every prompt each run scored, which is how the tests see the prompt stream.

Note on callback order: Lightning runs ``ModelCheckpoint`` after the other callbacks, so when the recorder reports
step ``s`` the checkpoint of step ``s - 1`` is complete and the one of step ``s`` is not yet started.
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

from tests.helpers.cli import make_tiny_model_dir, read_jsonl, subprocess_env, write_run_config

pytestmark = pytest.mark.integration

PROMPTS_PER_STEP = 2
MORE_STEPS = 3


def _start(config: Path, out: Path, cwd: Path, *args: str, sleep: float = 0.0) -> subprocess.Popen:
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "longact_lightning.cli", "fit", "--config", str(config), *args]
    env = subprocess_env(out, LONGACT_TEST_STEP_SLEEP=str(sleep))
    log = open(out / "cli.log", "w")  # noqa: SIM115 - closed when the process is reaped
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)


def _wait_for_step(proc: subprocess.Popen, out: Path, step: int, timeout: float = 300) -> int:
    """Block until the run reports ``global_step >= step``; return the step it reported."""
    deadline = time.monotonic() + timeout
    progress = out / "progress_rank0.json"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the run exited with {proc.returncode} before step {step}:\n{_log(out)}")
        if progress.exists():
            try:
                reported = json.loads(progress.read_text())["global_step"]
            except (json.JSONDecodeError, KeyError):  # caught mid-write
                reported = -1
            if reported >= step:
                return reported
        time.sleep(0.1)
    proc.kill()
    pytest.fail(f"no step {step} within {timeout}s:\n{_log(out)}")


def _log(out: Path) -> str:
    path = out / "cli.log"
    return path.read_text()[-6000:] if path.exists() else ""


def _load(path: Path) -> dict:
    return torch.load(path, weights_only=False, map_location="cpu")


def _longact_state(checkpoint: dict) -> dict:
    keys = [key for key in checkpoint["callbacks"] if key.startswith("LongAct")]
    assert len(keys) == 1, sorted(checkpoint["callbacks"])
    return checkpoint["callbacks"][keys[0]]


def _scored(out: Path) -> list[int]:
    return sorted({row["index"] for row in read_jsonl(out / "prompts_rank0.jsonl")})


def test_sigkill_then_resume_from_last(tmp_path):
    model_dir = make_tiny_model_dir(tmp_path / "tiny")
    first, second = tmp_path / "first", tmp_path / "second"
    ckpt_dir = first / "checkpoints"
    config = write_run_config(tmp_path / "run.yaml", model_dir, first, **{"trainer.max_steps": 40})

    # Run 1: wait for step 3 to be under way (so step 2's checkpoint is complete), freeze the process, read the
    # last checkpoint it completed, then SIGKILL: no handler, no final save.
    start = time.perf_counter()
    proc = _start(config, first, tmp_path, sleep=1.0)
    _wait_for_step(proc, first, 3)
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        last = _load(ckpt_dir / "last.ckpt")
    except Exception:  # frozen in the middle of writing last.ckpt: let it finish and look again
        os.kill(proc.pid, signal.SIGCONT)
        time.sleep(0.5)
        os.kill(proc.pid, signal.SIGSTOP)
        last = _load(ckpt_dir / "last.ckpt")
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    first_seconds = time.perf_counter() - start
    k = last["global_step"]
    assert k >= 2
    assert not (first / "rank0.json").exists()  # the run really died mid-training
    step_k = _load(ckpt_dir / f"epoch=0-step={k}.ckpt")
    assert step_k["global_step"] == k
    consumed_at_k = step_k["RolloutDataModule"]["prompts_consumed"]
    assert consumed_at_k == PROMPTS_PER_STEP * k
    masks_at_k = _longact_state(step_k)["row_mask"]["masks"]
    assert len(masks_at_k) == 4 and all(mask.any() and not mask.all() for mask in masks_at_k.values())
    # Run 1 scored every prompt before the checkpoint's position (and maybe the next step's, never trained on).
    assert set(range(consumed_at_k)) <= set(_scored(first))

    # Run 2: same config, `--ckpt_path last` (found through checkpoint.dirpath), a few more steps.
    start = time.perf_counter()
    proc = _start(config, second, tmp_path, "--ckpt_path", "last", "--trainer.max_steps", str(k + MORE_STEPS))
    assert proc.wait(timeout=600) == 0, _log(second)
    second_seconds = time.perf_counter() - start
    verdict = json.loads((second / "rank0.json").read_text())

    # It continued from step k ...
    assert verdict["start_step"] == k
    assert verdict["steps"] == list(range(k + 1, k + MORE_STEPS + 1))
    assert verdict["global_step"] == k + MORE_STEPS
    # ... with the masks of the step-k checkpoint, unchanged to the end ...
    resumed = torch.load(second / "rank0.pt")
    for masks in (resumed["start_masks"], resumed["end_masks"]):
        assert masks.keys() == masks_at_k.keys()
        for name, mask in masks_at_k.items():
            assert torch.equal(masks[name], mask), name
    # ... frozen rows bit-identical to the original model on disk across the kill and the resume ...
    assert verdict["ok"], verdict["failures"]
    # ... and the prompt stream went on exactly where the checkpoint left it: no consumed prompt replayed, none
    # skipped.
    assert _scored(second) == list(range(consumed_at_k, consumed_at_k + PROMPTS_PER_STEP * MORE_STEPS))
    final = _load(ckpt_dir / "last.ckpt")
    assert final["global_step"] == k + MORE_STEPS
    assert final["RolloutDataModule"]["prompts_consumed"] == PROMPTS_PER_STEP * (k + MORE_STEPS)
    print(f"killed at step {k} after {first_seconds:.0f}s; resumed run took {second_seconds:.0f}s")


def test_ckpt_path_last_finds_the_runs_checkpoints_without_a_dirpath(tmp_path):
    model_dir = make_tiny_model_dir(tmp_path / "tiny")
    root = tmp_path / "root"
    # no checkpoint.dirpath: checkpoints go to <trainer.default_root_dir>/checkpoints, not a new version_N each run
    config = write_run_config(
        tmp_path / "run.yaml", model_dir, root, **{"trainer.max_steps": 2, "checkpoint.dirpath": None}
    )
    first, second = tmp_path / "first", tmp_path / "second"
    assert _start(config, first, tmp_path).wait(timeout=600) == 0, _log(first)
    assert _load(root / "checkpoints" / "last.ckpt")["global_step"] == 2
    proc = _start(config, second, tmp_path, "--ckpt_path", "last", "--trainer.max_steps", "3")
    assert proc.wait(timeout=600) == 0, _log(second)
    verdict = json.loads((second / "rank0.json").read_text())
    assert (verdict["start_step"], verdict["global_step"]) == (2, 3)


def test_sigterm_saves_a_checkpoint_and_exits(tmp_path):
    model_dir = make_tiny_model_dir(tmp_path / "tiny")
    out = tmp_path / "run"
    ckpt_dir = out / "checkpoints"
    # no periodic checkpoints: whatever is on disk afterwards was written because of the signal
    config = write_run_config(
        tmp_path / "run.yaml", model_dir, out, **{"trainer.max_steps": 200, "checkpoint.every_n_train_steps": 1000}
    )
    proc = _start(config, out, tmp_path, sleep=1.0)
    reported = _wait_for_step(proc, out, 2)
    assert not ckpt_dir.exists() or not any(ckpt_dir.iterdir())
    start = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    returncode = proc.wait(timeout=120)
    seconds = time.perf_counter() - start
    assert returncode == 128 + signal.SIGTERM, (
        f"exit code {returncode}: expected 143 (handled SIGTERM, checkpoint saved)"
    )
    saved = sorted(path.name for path in ckpt_dir.iterdir())
    assert "last.ckpt" in saved, saved
    last = _load(ckpt_dir / "last.ckpt")
    # The step in progress when the signal arrived finishes, then Lightning stops and the checkpoint is written.
    assert reported <= last["global_step"] <= reported + 1
    assert f"epoch=0-step={last['global_step']}.ckpt" in saved
    assert last["RolloutDataModule"]["prompts_consumed"] == PROMPTS_PER_STEP * last["global_step"]
    assert len(_longact_state(last)["row_mask"]["masks"]) == 4
    assert not (out / "rank0.json").exists()  # it stopped, it did not train to max_steps
    print(f"SIGTERM at step {reported}: exit code {returncode} after {seconds:.1f}s, saved {saved}")
