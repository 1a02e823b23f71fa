"""Crash safety of ``longact fit``: SIGKILL after a checkpoint, then ``--ckpt_path last``; SIGTERM between steps and
inside a step's generation or update phase.

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


def _start(
    config: Path, out: Path, cwd: Path, *args: str, sleep: float = 0.0, pass_sleep: float = 0.0
) -> subprocess.Popen:
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "longact_lightning.cli", "fit", "--config", str(config), *args]
    env = subprocess_env(out, LONGACT_TEST_STEP_SLEEP=str(sleep), LONGACT_TEST_PASS_SLEEP=str(pass_sleep))
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


def _phase(out: Path) -> dict:
    path = out / "phase_rank0.json"
    try:
        return json.loads(path.read_text()) if path.exists() else {}
    except json.JSONDecodeError:  # caught mid-write
        return {}


def _wait_for_phase(proc: subprocess.Popen, out: Path, phase: str, step: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the run exited with {proc.returncode} before the {phase} of step {step}:\n{_log(out)}")
        marker = _phase(out)
        if marker.get("phase") == phase and marker.get("global_step") == step:
            return
        time.sleep(0.02)
    proc.kill()
    pytest.fail(f"no {phase} of step {step} within {timeout}s:\n{_log(out)}")


# phase -> (overrides, seconds of sleep per pass, where the run says it stopped). generation: completions of 900 tokens
# (the random tiny model almost never samples EOS), seconds of decoding; update: one sequence per pass and a second of
# sleep in each of the step's 4 passes.
PHASES = {
    "generation": ({"data.max_new_tokens": 900}, 0.0, "during generation"),
    "update": ({"model.micro_batch_size": 1}, 1.0, "during the update passes"),
}


@pytest.mark.parametrize("phase", sorted(PHASES))
def test_sigterm_inside_a_step_exits_within_seconds_with_the_last_completed_step(tmp_path, phase):
    """SIGTERM while the third step generates or trains: exit 143 within 10 s, with a checkpoint equal to that of a run
    that stopped normally after two steps: weights, optimizer state, data position and the saliency statistics
    (collected through step 4, so the abandoned step's passes had added to them). The resumed run trains the
    abandoned step's prompts."""
    model_dir = make_tiny_model_dir(tmp_path / "tiny")
    reference, out, resumed = tmp_path / "reference", tmp_path / "run", tmp_path / "resumed"
    overrides, pass_sleep, where = PHASES[phase]
    # no periodic checkpoint: the one the interrupted run leaves is the signal's
    overrides = {"longact.collect_steps": 4, "checkpoint.every_n_train_steps": 1000, **overrides}
    config = write_run_config(tmp_path / "ref.yaml", model_dir, reference, **{"trainer.max_steps": 2, **overrides})
    assert _start(config, reference, tmp_path).wait(timeout=600) == 0, _log(reference)
    before = _load(reference / "checkpoints" / "last.ckpt")

    config = write_run_config(tmp_path / "run.yaml", model_dir, out, **{"trainer.max_steps": 40, **overrides})
    proc = _start(config, out, tmp_path, pass_sleep=pass_sleep)
    _wait_for_phase(proc, out, phase, 2)
    assert not list((out / "checkpoints").glob("*.ckpt"))  # none but the signal's to come
    time.sleep(0.5)
    start = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    returncode = proc.wait(timeout=120)
    seconds = time.perf_counter() - start
    text = _log(out)
    assert returncode == 128 + signal.SIGTERM, f"exit code {returncode}\n{text}"
    assert seconds < 10, f"{seconds:.1f}s from SIGTERM to exit"
    assert where in text, text
    assert _phase(out)["global_step"] == 2  # it stopped inside step 2, not after it

    after = _load(out / "checkpoints" / "last.ckpt")
    assert after["global_step"] == before["global_step"] == 2
    assert after["state_dict"].keys() == before["state_dict"].keys()
    for name, tensor in before["state_dict"].items():
        assert torch.equal(after["state_dict"][name], tensor), name
    for old, new in zip(
        before["optimizer_states"][0]["state"].values(), after["optimizer_states"][0]["state"].values()
    ):
        assert all(torch.equal(old[key], new[key]) for key in old)
    position = ("epoch", "prompts_consumed", "rank_positions", "source")  # the totals count the abandoned work too
    assert [after["RolloutDataModule"][k] for k in position] == [before["RolloutDataModule"][k] for k in position]
    assert after["RolloutDataModule"]["prompts_consumed"] == PROMPTS_PER_STEP * 2
    stats_before, stats_after = _longact_state(before)["stats"], _longact_state(after)["stats"]
    assert stats_after.keys() == stats_before.keys() and stats_before
    for key, stats in stats_before.items():
        assert all(torch.equal(stats_after[key][name], value) for name, value in stats.items()), key

    proc = _start(config, resumed, tmp_path, "--ckpt_path", "last", "--trainer.max_steps", "3")
    assert proc.wait(timeout=600) == 0, _log(resumed)
    verdict = json.loads((resumed / "rank0.json").read_text())
    assert (verdict["start_step"], verdict["steps"]) == (2, [3])
    assert _scored(resumed) == list(range(PROMPTS_PER_STEP * 2, PROMPTS_PER_STEP * 3))
    print(f"SIGTERM during {phase} of step 2: exit {returncode} after {seconds:.1f}s")
