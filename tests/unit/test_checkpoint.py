"""RankSafeCheckpoint's own argument and its atomic writes (its multi-rank behaviour:
tests/integration/test_cli_distributed.py)."""

from __future__ import annotations

import errno
import subprocess
import sys
import textwrap

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from longact_lightning.callbacks import RankSafeCheckpoint
from longact_lightning.callbacks.checkpoint import AtomicCheckpointIO
from tests.helpers.models import LMModule, random_lm_batches, tiny_model


def test_checkpoint_agreement_needs_a_positive_wait():
    with pytest.raises(ValueError, match="agree_seconds=0 must be > 0"):
        RankSafeCheckpoint(agree_seconds=0)


def _partial_save_then(failure):
    """A ``torch.save`` that writes part of the file, then fails as ``failure`` says."""

    def save(obj, file):
        file.write(b"\0" * 4096)
        failure()

    return save


def test_a_save_that_runs_out_of_disk_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    io, path = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.arange(1000)}, path)

    def disk_full():
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", _partial_save_then(disk_full))
    with pytest.raises(OSError, match="No space left"):
        io.save_checkpoint({"step": 2, "w": torch.zeros(1000)}, path)
    monkeypatch.undo()
    assert torch.load(path)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no temporary file left


_KILLED_SAVE = textwrap.dedent(
    """
    import os, sys, torch
    from longact_lightning.callbacks.checkpoint import AtomicCheckpointIO

    io, path = AtomicCheckpointIO(), sys.argv[1]
    io.save_checkpoint({"step": 1}, path)

    def killed(obj, file):
        file.write(b"\\0" * 4096)
        file.flush()
        os._exit(9)  # as SIGKILL: no cleanup runs

    torch.save = killed
    io.save_checkpoint({"step": 2}, path)
    """
)


def test_a_killed_save_leaves_the_previous_checkpoint_and_the_next_run_removes_its_temporary_file(tmp_path):
    path = tmp_path / "ckpts" / "last.ckpt"
    done = subprocess.run([sys.executable, "-c", _KILLED_SAVE, str(path)], capture_output=True, text=True)
    assert done.returncode == 9, done.stderr
    assert torch.load(path)["step"] == 1
    (leftover,) = [p for p in path.parent.iterdir() if p.name != "last.ckpt"]

    callback = RankSafeCheckpoint(dirpath=path.parent, save_last=True)
    trainer = pl.Trainer(
        max_steps=1, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[callback],
    )  # fmt: skip
    with pytest.warns(UserWarning, match="Removed .*temporary file of a checkpoint save"):
        trainer.fit(LMModule(tiny_model("llama_gqa")), DataLoader(random_lm_batches(1), batch_size=None))
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    assert not leftover.exists()
    assert torch.load(callback.last_model_path, weights_only=False)["global_step"] == 1  # the new run saved
