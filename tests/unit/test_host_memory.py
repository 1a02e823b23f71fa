"""HostMemoryReuse: freed CPU memory stays in the heap, so the next step's allocations need no fresh pages."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest

from longact_lightning.callbacks import host_memory
from longact_lightning.callbacks.host_memory import HostMemoryReuse

_MALLINFO = textwrap.dedent(
    """
    import ctypes
    import torch
    from longact_lightning.callbacks.host_memory import retain_freed_host_memory

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in
                    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                     "keepcost")]

    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = MallInfo2
    """
)
_PROBE = _MALLINFO + textwrap.dedent(
    """
    SIZE = 64 * 2**20

    def mmapped_while_alive():
        block = torch.ones(SIZE, dtype=torch.uint8)
        return libc.mallinfo2().hblkhd

    before = mmapped_while_alive()
    assert retain_freed_host_memory()
    after = mmapped_while_alive()
    free_in_heap = libc.mallinfo2().fordblks
    print(before >= SIZE, after < SIZE, free_in_heap >= SIZE)
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc statistics")
def test_freed_blocks_stay_in_the_heap_instead_of_being_unmapped():
    # in a fresh process: the setting is process-wide and would outlive this test
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, check=True).stdout.split()
    # by default a 64 MB tensor gets its own mmap; afterwards it comes from the heap, and stays there once freed
    assert out == ["True", "True", "True"]


_OWN_PAGES_PROBE = _MALLINFO + textwrap.dedent(
    """
    def mmapped_while_alive(mb):
        before = libc.mallinfo2().hblkhd
        block = torch.ones(mb << 20, dtype=torch.uint8)
        return libc.mallinfo2().hblkhd - before >= mb << 20

    assert retain_freed_host_memory(own_pages_from_mb=8)
    print(mmapped_while_alive(4), mmapped_while_alive(16), libc.mallinfo2().fordblks >= 4 << 20)
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc statistics")
def test_blocks_from_the_threshold_up_get_their_own_pages():
    out = subprocess.run(
        [sys.executable, "-c", _OWN_PAGES_PROBE], capture_output=True, text=True, check=True
    ).stdout.split()
    # a 4 MB block comes from the heap (and its memory stays there once freed); a 16 MB block is mapped on its own
    assert out == ["False", "True", "True"]


@pytest.mark.parametrize("enabled", [True, False])
def test_callback_applies_the_setting_on_the_cpu_only_when_enabled(monkeypatch, enabled):
    calls = []
    monkeypatch.setattr(host_memory, "retain_freed_host_memory", lambda *_: calls.append(1) or True)
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False)
    HostMemoryReuse(enabled=enabled).setup(trainer, pl.LightningModule(), "fit")
    assert len(calls) == int(enabled)


def test_free_pages_are_released_after_every_nth_step_only_while_active(monkeypatch):
    released = []
    monkeypatch.setattr(host_memory, "retain_freed_host_memory", lambda *_: True)
    monkeypatch.setattr(host_memory, "release_free_host_memory", lambda: released.append(1) or True)
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False)
    callback = HostMemoryReuse(release_every_n_steps=2)
    callback.on_train_batch_end(SimpleNamespace(global_step=2), pl.LightningModule())  # before setup: glibc's heap
    callback.setup(trainer, pl.LightningModule(), "fit")
    for step in range(1, 7):
        callback.on_train_batch_end(SimpleNamespace(global_step=step), pl.LightningModule())
    assert len(released) == 3  # after steps 2, 4, 6


def test_a_negative_release_interval_is_rejected():
    with pytest.raises(ValueError, match="release_every_n_steps=-1"):
        HostMemoryReuse(release_every_n_steps=-1)
    with pytest.raises(ValueError, match="own_pages_from_mb=64 must be 1 to 32"):
        HostMemoryReuse(own_pages_from_mb=64)
