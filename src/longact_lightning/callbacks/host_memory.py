"""Keep freed CPU memory in the process, so a training step does not page-fault its activations in every time."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

log = logging.getLogger(__name__)

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_NEVER_TRIM = 2**31 - 1


def retain_freed_host_memory() -> bool:
    """Make glibc's malloc serve every block from its heap and never hand freed memory back to the OS.

    Returns whether the C library took the setting (``False`` off glibc, e.g. macOS or musl, where nothing changes).
    The process keeps its peak heap until it exits; freed blocks are reused by the next allocations.
    """
    libc_name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(libc_name) if libc_name else None
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM))


class HostMemoryReuse(Callback):
    """Reuse freed host (CPU) memory across training steps instead of returning it to the OS and faulting it back in.

    PyTorch caches GPU memory but not CPU memory: CPU tensors come from the C library's ``malloc``, which serves every
    large block with fresh ``mmap`` pages and unmaps them on free. A training step on the CPU allocates and frees the
    same gigabytes of activations, logits and gradients every micro-batch, so every step the kernel zero-fills and
    maps all of them again. On the 2-core reference machine that page faulting was ~25 % of a bf16 RL step on
    SmolLM2-135M (``benchmarks/RESULTS.md``). With this callback freed blocks stay in the heap and are reused. The
    price is memory: the heap never shrinks, and blocks of changing sizes fragment it, so the resident set keeps
    growing for a while: on that workload 0.6-1.2 GB more than without the callback after 12 steps, still growing
    by 106-158 MB per step against 48-73 MB (``benchmarks/rss_growth.py``). Where memory is tighter than time, turn
    it off.

    The setting is process-wide and stays for the life of the process. It is applied at ``setup`` on every rank and
    does nothing where tensors live on an accelerator (their memory has its own caching allocator) or off glibc.

    Args:
        enabled: ``False`` leaves the C library's defaults alone (set ``--host_memory.enabled false`` on the CLI).
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not self.enabled or trainer.strategy.root_device.type != "cpu":
            return
        if not retain_freed_host_memory():
            log.info("HostMemoryReuse: the C library is not glibc; freed CPU memory is handled by its own defaults.")
