"""The stop request behind prompt SIGTERM handling (the end-to-end runs: tests/integration/test_cli_resume.py and
test_cli_distributed.py)."""

from __future__ import annotations

import os
import signal
from types import SimpleNamespace

import pytest
import torch.distributed as dist

from longact_lightning.cli import LongActTrainer
from longact_lightning.stopping import EXIT_CODE, LocalSignalConnector, StopCheck, interrupted


def test_a_stop_is_requested_once_this_process_got_sigterm():
    trainer = SimpleNamespace(received_sigterm=False, world_size=1)
    check = StopCheck(trainer)
    assert not check() and not check.agreed()
    trainer.received_sigterm = True
    assert check() and check.agreed()
    assert not StopCheck(None)() and not StopCheck(None).agreed()


def test_the_interrupt_exits_like_a_process_killed_by_sigterm():
    error = interrupted("generation")
    assert isinstance(error, SystemExit) and error.code == EXIT_CODE == 143


def test_the_sigterm_handler_only_records_the_signal(monkeypatch):
    """Lightning's own handler broadcasts from inside the signal handler; ours must not start any collective, and
    leaves the decision to StopCheck."""
    monkeypatch.setattr(dist, "broadcast", lambda *a, **k: pytest.fail("a collective inside the signal handler"))
    trainer = LongActTrainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False)
    connector = trainer._signal_connector
    assert isinstance(connector, LocalSignalConnector)
    connector.register_signal_handlers()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        assert connector.stop_requested and StopCheck(trainer)()
        assert not trainer.received_sigterm  # Lightning's rank-local end-of-step exit stays out of it
    finally:
        connector.teardown()
