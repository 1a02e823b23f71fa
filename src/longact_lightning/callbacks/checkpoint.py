"""``ModelCheckpoint`` whose checkpoint-on-exception cannot hang a healthy rank.

Saving a checkpoint under FSDP (and Lightning's barriers under any strategy) is a collective. When every rank fails
together (a dynamic-sampling give-up, which the ranks agree on; SIGTERM) they all save, as Lightning does. When one
rank fails alone (out of memory, an engine error), the others are inside some other collective — the next forward's
all-gather — and a save there would never match it: both sides wait forever. So before saving, the failing ranks
agree through the process group's key-value store (served by a thread of rank 0's process, so it answers even while
rank 0's main thread is blocked): the checkpoint is written only if every rank reaches ``on_exception`` within
``agree_seconds``; otherwise no rank writes it (``last.ckpt`` of the last completed step stays), the failing rank
exits, and the others' collective then fails and brings them here to the same "skip" decision.

Every file it writes is written atomically (:class:`AtomicCheckpointIO`): a save that is killed or runs out of disk
leaves the previous ``last.ckpt`` as it was.
"""

from __future__ import annotations

import os
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
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

_TEMP_SUFFIX = ".partial"


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` into a temporary file next to the checkpoint, ``fsync``, then ``os.replace`` onto its name.

    Lightning's own atomic save stages the file in the system's temporary directory and moves it into place; when
    that is another filesystem the move is a copy, and a kill or a full disk during it truncates the previous
    checkpoint. A rename within one directory either happens whole or not at all. A failed save removes its temporary
    file; one a kill leaves behind (``.<name>.<random>.partial``) is removed by :meth:`remove_stale` at the next start.
    """

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
        """Delete temporary files a killed save left in ``directory``; returns what was removed."""
        stale = sorted(directory.glob(f".*{_TEMP_SUFFIX}")) if directory.is_dir() else []
        for path in stale:
            path.unlink(missing_ok=True)
        return stale


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
        proposal = b"save" if arrived >= trainer.world_size else b"skip"
        return store.compare_set(f"{key}/decision", b"", proposal) == b"save"  # the first decision binds every rank
