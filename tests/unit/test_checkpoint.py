"""RankSafeCheckpoint's own argument and its atomic writes (its multi-rank behaviour:
tests/integration/test_cli_distributed.py)."""

from __future__ import annotations

import errno
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from longact_lightning.callbacks import RankSafeCheckpoint
from longact_lightning.callbacks.checkpoint import AtomicCheckpointIO, stage_saves
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
    from longact_lightning.callbacks.checkpoint import AtomicCheckpointIO, stage_saves

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


def test_an_unreadable_last_checkpoint_falls_back_to_the_newest_one_that_loads(tmp_path):
    io = AtomicCheckpointIO()
    for step in (1, 2, 3):
        io.save_checkpoint({"global_step": step}, tmp_path / f"epoch=0-step={step}.ckpt")
    (tmp_path / "epoch=0-step=3.ckpt").write_bytes(b"\0" * 100)  # damaged too
    (tmp_path / "last.ckpt").write_bytes((tmp_path / "epoch=0-step=2.ckpt").read_bytes()[:-40])  # cut short
    with pytest.warns(UserWarning, match=r"last.ckpt cannot be loaded .* resuming from .*step=2.ckpt \(step 2\)"):
        assert io.load_checkpoint(tmp_path / "last.ckpt") == {"global_step": 2}
    with pytest.raises(Exception):  # noqa: B017, PT011 - whatever torch.load says about a damaged file
        io.load_checkpoint(tmp_path / "epoch=0-step=3.ckpt")  # an explicit checkpoint is never swapped

    for path in tmp_path.glob("epoch=*"):
        path.unlink()
    with pytest.raises(RuntimeError, match="no other checkpoint in .* loads; start without ckpt_path"):
        io.load_checkpoint(tmp_path / "last.ckpt")


class _ShardedSaves:
    """What FSDP's sharded save does, in one process: a directory with one file per rank, written in place."""

    is_global_zero = True

    def __init__(self) -> None:
        self.fail_after_shards: int | None = None

    def barrier(self, name: str | None = None) -> None:
        pass

    def save_checkpoint(self, checkpoint, filepath, storage_options=None) -> None:
        path = Path(filepath)
        path.mkdir(exist_ok=True)
        for rank in range(2):
            if rank == self.fail_after_shards:
                raise OSError(errno.ENOSPC, "No space left on device")
            torch.save({**checkpoint, "rank": rank}, path / f"shard{rank}.pt")


def _steps(directory: Path) -> list[int]:
    return [torch.load(directory / f"shard{rank}.pt")["step"] for rank in range(2)]


def test_a_sharded_save_is_staged_and_moved_into_place_whole(tmp_path):
    strategy, target = _ShardedSaves(), tmp_path / "last.ckpt"
    stage_saves(strategy)
    stage_saves(strategy)  # idempotent: one setup per fit, several fits per strategy
    strategy.save_checkpoint({"step": 1}, target)
    assert _steps(target) == [1, 1] and sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]

    strategy.fail_after_shards = 1  # rank 1's part never arrives: in place, this would mix steps 1 and 2
    with pytest.raises(OSError, match="No space left"):
        strategy.save_checkpoint({"step": 2}, target)
    assert _steps(target) == [1, 1]
    assert AtomicCheckpointIO.remove_stale(tmp_path) == [tmp_path / ".last.ckpt.partial"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]

    strategy.fail_after_shards = None
    strategy.save_checkpoint({"step": 3}, target)
    assert _steps(target) == [3, 3] and sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]

    target.rename(tmp_path / ".last.ckpt.previous")  # killed between the two renames of a swap
    AtomicCheckpointIO.remove_stale(tmp_path)
    assert _steps(target) == [3, 3] and sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
