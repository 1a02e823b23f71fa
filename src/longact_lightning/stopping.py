"""Stopping a run within seconds of SIGTERM, at a point where nothing is half done.

Lightning acts on SIGTERM between training steps. An RL step here is minutes long (a generation phase, then the
scoring and update passes), longer than a scheduler's grace period before its SIGKILL, so the step in flight is
abandoned instead: generation stops between decode steps, training between micro-batches, before the step's first
optimizer update. Nothing of the abandoned step reaches the checkpoint Lightning then writes on the exception: the
weights and optimizer are untouched, the DataModule reports the stream position before the step's prompts and the
saliency callback its statistics before the step's passes. The run exits with 128 + 15 and resumes at that step.

Under data parallelism every rank must stop at the same point, since the passes (and the checkpoint save) are
collectives. The ranks usually all get the signal (a scheduler signals every task, Lightning's launcher forwards it),
but not at the same instant, and one rank may be blocked in a collective the others will never join. So a rank that
sees the signal announces it in the process group's key-value store, which the others poll (:class:`StopCheck`);
each rank's engine stops on its own, and the ranks decide together in the all-gather that ends every batch's
generation (``RolloutDataModule``), a rank that had finished included. In the training passes the check is itself
a collective (:meth:`StopCheck.agreed`), so all ranks leave after the same micro-batch.

Lightning's own handling is replaced (:class:`LocalSignalConnector`, installed by the ``longact`` CLI's trainer): its
end-of-step check is rank-local, so a rank that got the signal just before it would leave while the others start the
next step's collectives. A signal between steps is acted on at the next step's first decode step instead.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.trainer.connectors.signal_connector import _SignalConnector
from lightning.pytorch.utilities.exceptions import SIGTERMException
from typing_extensions import override

log = logging.getLogger(__name__)

EXIT_CODE = 128 + 15  # what a process killed by SIGTERM reports; schedulers requeue on it
_STORE_KEY = "longact/stop"


def interrupted(where: str) -> SIGTERMException:
    """The exception that abandons the step in flight; Lightning saves the checkpoint on it, the process exits 143."""
    log.warning(
        "SIGTERM: the step in flight is abandoned during %s; the checkpoint holds the last completed one.", where
    )
    return SIGTERMException(EXIT_CODE)


class StopCheck:
    """Whether the run should stop now: this process received SIGTERM, or another rank announced that it did.

    Calling it is cheap (the store is read at most every ``poll_seconds``), so it can run between decode steps.

    Args:
        trainer: the trainer whose SIGTERM flag (``trainer.received_sigterm``) is read; ``None`` never stops.
        poll_seconds: how often other ranks' announcements are looked up.
    """

    def __init__(self, trainer: Any, poll_seconds: float = 0.5) -> None:
        self.trainer = trainer
        self.poll_seconds = poll_seconds
        self._announced = False
        self._seen_elsewhere = False
        self._next_poll = 0.0

    def __call__(self) -> bool:
        trainer = self.trainer
        if trainer is None:
            return False
        distributed = trainer.world_size > 1 and dist.is_available() and dist.is_initialized()
        connector = getattr(trainer, "_signal_connector", None)
        if trainer.received_sigterm or getattr(connector, "stop_requested", False):
            if distributed and not self._announced:
                _store().set(_STORE_KEY, b"1")
                self._announced = True
            return True
        if distributed and not self._seen_elsewhere and time.monotonic() >= self._next_poll:
            self._seen_elsewhere = _store().check([_STORE_KEY])
            self._next_poll = time.monotonic() + self.poll_seconds
        return self._seen_elsewhere

    def agreed(self) -> bool:
        """The same answer on every rank (a one-element all-reduce): call it where all ranks are in step."""
        stop = self()
        trainer = self.trainer
        if trainer is None or trainer.world_size == 1:
            return stop
        flag = torch.tensor(float(stop), device=trainer.strategy.root_device)
        return bool(trainer.strategy.reduce(flag, reduce_op="max") > 0)


class LocalSignalConnector(_SignalConnector):
    """Lightning's signal handling, with SIGTERM left to :class:`StopCheck`.

    Lightning 2.6's handler broadcasts from rank 0 wherever the signal interrupts the program (a rank blocked in
    another collective at that moment is matched against the wrong operation), and its loops act on the flag it sets
    rank by rank. Here the handler only records the signal as ``stop_requested`` (and forwards it to the launcher's
    processes, as Lightning does); Lightning's ``received_sigterm`` stays False.
    """

    stop_requested = False

    @override
    def _sigterm_notifier_fn(self, signum: Any, _: Any) -> None:
        if not self.stop_requested and self.trainer.strategy.launcher is not None:
            self.trainer.strategy.launcher.kill(signum)
        self.stop_requested = True


def _store() -> Any:
    return dist.distributed_c10d._get_default_store()
