"""``ModelCheckpoint`` whose checkpoint-on-exception cannot hang a healthy rank.

Saving a checkpoint under FSDP (and Lightning's barriers under any strategy) is a collective. When every rank fails
together (a dynamic-sampling give-up, which the ranks agree on; SIGTERM) they all save, as Lightning does. When one
rank fails alone (out of memory, an engine error), the others are inside some other collective — the next forward's
all-gather — and a save there would never match it: both sides wait forever. So before saving, the failing ranks
agree through the process group's key-value store (served by a thread of rank 0's process, so it answers even while
rank 0's main thread is blocked): the checkpoint is written only if every rank reaches ``on_exception`` within
``agree_seconds``; otherwise no rank writes it (``last.ckpt`` of the last completed step stays), the failing rank
exits, and the others' collective then fails and brings them here to the same "skip" decision.

Every checkpoint it writes appears whole or not at all: a single file through :class:`AtomicCheckpointIO`; under
FSDP, whose sharded checkpoints are directories that every rank writes its part of (and which Lightning would write
into the previous ``last.ckpt`` in place), the whole save is staged beside the target and moved into place once
every rank is done (:func:`stage_saves`). A save that is killed or runs out of disk leaves the previous ``last.ckpt``
as it was. A ``last.ckpt`` damaged some other way (a disk error, a copy cut short)
does not block the resume: the newest checkpoint beside it that loads is used instead, with a warning.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from contextlib import suppress
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy, Strategy
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

_TEMP_SUFFIX = ".partial"
_PREVIOUS_SUFFIX = ".previous"


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` into a temporary file next to the checkpoint, ``fsync``, then ``os.replace`` onto its name.

    Lightning's own atomic save stages the file in the system's temporary directory and moves it into place; when
    that is another filesystem the move is a copy, and a kill or a full disk during it truncates the previous
    checkpoint. A rename within one directory either happens whole or not at all. A failed save removes its temporary
    file; one a kill leaves behind (``.<name>.<random>.partial``) is removed by :meth:`remove_stale` at the next start.

    Loading a ``last*.ckpt`` that cannot be read falls back to the newest other ``*.ckpt`` of its directory that can.
    """

    @override
    def load_checkpoint(self, path: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        try:
            return super().load_checkpoint(path, *args, **kwargs)
        except FileNotFoundError:
            raise
        except Exception as error:
            target = Path(path)
            if not target.name.startswith("last"):
                raise
            others = [p for p in target.parent.glob("*.ckpt") if p != target]
            for candidate in sorted(others, key=lambda p: p.stat().st_mtime, reverse=True):
                try:
                    checkpoint = super().load_checkpoint(candidate, *args, **kwargs)
                except Exception:  # damaged too: try the next older one
                    continue
                rank_zero_warn(
                    f"{target} cannot be loaded ({type(error).__name__}: {error}); resuming from {candidate} "
                    f"(step {checkpoint.get('global_step')}), the newest checkpoint beside it that loads."
                )
                return checkpoint
            raise RuntimeError(
                f"{target} cannot be loaded ({type(error).__name__}: {error}) and no other checkpoint in "
                f"{target.parent} loads; start without ckpt_path or point it at a good checkpoint."
            ) from error

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError(f"AtomicCheckpointIO.save_checkpoint takes no storage_options, got {storage_options!r}.")
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=_TEMP_SUFFIX)
        try:
            with os.fdopen(fd, "wb") as file:
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, target)
        except BaseException:
            with suppress(FileNotFoundError):
                os.unlink(temporary)
            raise
        directory = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(directory)  # the rename itself survives a power cut
        finally:
            os.close(directory)

    @staticmethod
    def remove_stale(directory: Path) -> list[Path]:
        """Delete what a killed save left in ``directory`` (temporary files, staged directories) and put back a
        previous checkpoint a kill left set aside (see :func:`stage_saves`); returns what was removed."""
        if not directory.is_dir():
            return []
        for previous in sorted(directory.glob(f".*{_PREVIOUS_SUFFIX}")):
            target = previous.with_name(previous.name[1 : -len(_PREVIOUS_SUFFIX)])
            if target.exists():
                _remove(previous)
            else:
                os.replace(previous, target)
        stale = sorted(directory.glob(f".*{_TEMP_SUFFIX}"))
        for path in stale:
            _remove(path)
        return stale


def stage_saves(strategy: Strategy) -> None:
    """Make ``strategy.save_checkpoint`` write to ``.<name>.partial`` beside the target, then (on rank 0, after every
    rank has written its part) move it into place: a file by one rename, a directory by two (the old one set aside
    as ``.<name>.previous`` in between, which :meth:`AtomicCheckpointIO.remove_stale` puts back if a kill falls
    there)."""
    save = strategy.save_checkpoint
    if getattr(save, "stages_saves", False):
        return

    def save_checkpoint(checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        target = Path(filepath)
        staging = target.with_name(f".{target.name}{_TEMP_SUFFIX}")
        save(checkpoint, staging, storage_options)
        strategy.barrier("longact_staged_save")
        if strategy.is_global_zero:
            _move_into_place(staging, target)
        strategy.barrier("longact_staged_save_done")

    save_checkpoint.stages_saves = True  # type: ignore[attr-defined]
    strategy.save_checkpoint = save_checkpoint  # type: ignore[method-assign]


def _move_into_place(staging: Path, target: Path) -> None:
    if staging.is_file() and not target.is_dir():
        os.replace(staging, target)
        return
    previous = target.with_name(f".{target.name}{_PREVIOUS_SUFFIX}")
    if previous.exists():
        _remove(previous)
    if target.exists():
        os.replace(target, previous)
    os.replace(staging, target)
    if previous.exists():
        _remove(previous)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


class RankSafeCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint``, saving on exception only when every rank failed (see the module docstring).

    Args:
        agree_seconds: how long a failing rank waits for the others to fail too before it gives up the save.
        kwargs: Lightning's ``ModelCheckpoint`` arguments.
    """

    def __init__(self, *args: Any, agree_seconds: float = 30.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not agree_seconds > 0:
            raise ValueError(f"agree_seconds={agree_seconds} must be > 0 (how long failing ranks wait for each other).")
        self.agree_seconds = agree_seconds

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # a user's own CheckpointIO stays
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        if isinstance(trainer.strategy, (FSDPStrategy, ModelParallelStrategy)):  # they write sharded directories
            stage_saves(trainer.strategy)
        if trainer.is_global_zero and self.dirpath is not None:
            for path in AtomicCheckpointIO.remove_stale(Path(self.dirpath)):
                rank_zero_warn(f"Removed {path}, the temporary file of a checkpoint save that was interrupted.")

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if trainer.world_size > 1 and dist.is_initialized() and not self._every_rank_failed(trainer):
            rank_zero_warn(
                f"Rank {trainer.global_rank} failed alone ({type(exception).__name__}); no checkpoint is saved on this "
                "exception, since saving is a collective the other ranks are not in. Resume from last.ckpt."
            )
            return
        super().on_exception(trainer, pl_module, exception)

    def _every_rank_failed(self, trainer: pl.Trainer) -> bool:
        store = dist.distributed_c10d._get_default_store()
        key = f"longact/exception/{trainer.global_step}"
        arrived = store.add(f"{key}/count", 1)
        deadline = time.monotonic() + self.agree_seconds
        while arrived < trainer.world_size and time.monotonic() < deadline:
            time.sleep(0.05)
            arrived = store.add(f"{key}/count", 0)
        proposal = "save" if arrived >= trainer.world_size else "skip"
        # the first decision binds every rank; the store hands values back as bytes
        return store.compare_set(f"{key}/decision", "", proposal) == b"save"
