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
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
_NEVER_TRIM = 2**31 - 1
# glibc refuses an mmap threshold above HEAP_MAX_SIZE / 2, 32 MiB on 64-bit systems
MAX_MMAP_THRESHOLD_MB = 32


def _glibc() -> ctypes.CDLL | None:
    libc_name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(libc_name) if libc_name else None
    return libc if libc is not None and hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def retain_freed_host_memory(own_pages_from_mb: int | None = None) -> bool:
    """Make glibc's malloc serve blocks from its heap and never hand freed memory back to the OS by itself.

    Returns whether the C library took the setting (``False`` off glibc, e.g. macOS or musl, where nothing changes).
    Freed blocks stay in the heap and are reused by the next allocations, until :func:`release_free_host_memory`.
    ``own_pages_from_mb`` keeps blocks of at least that many MiB out of the heap (each gets its own pages, returned on
    free); ``None`` serves every block from the heap.
    """
    libc = _glibc()
    if libc is None:
        return False
    if own_pages_from_mb is None:
        large = bool(libc.mallopt(_M_MMAP_MAX, 0))
    else:
        large = bool(libc.mallopt(_M_MMAP_THRESHOLD, own_pages_from_mb << 20))
    return large and bool(libc.mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM))


def release_free_host_memory() -> bool:
    """Hand the heap's free pages back to the OS (glibc's ``malloc_trim``); returns whether any were released."""
    libc = _glibc()
    return libc is not None and bool(libc.malloc_trim(0))


class HostMemoryReuse(Callback):
    """Reuse freed host (CPU) memory within a training step instead of returning it to the OS and faulting it back in.

    PyTorch caches GPU memory but not CPU memory: CPU tensors come from the C library's ``malloc``, which serves every
    large block with fresh ``mmap`` pages and unmaps them on free. A training step on the CPU allocates and frees the
    same gigabytes of activations, logits and gradients every micro-batch, so every step the kernel zero-fills and
    maps all of them again. On the 2-core reference machine that page faulting was ~25 % of a bf16 RL step on
    SmolLM2-135M (``benchmarks/RESULTS.md``). With this callback freed blocks stay in the heap and are reused. Kept
    for the whole run, the heap fragments under changing sequence lengths and the resident set keeps growing (to 8.1
    GB after 40 steps on that workload, against 6.8 GB without the callback; ``benchmarks/rss_growth.py``). So by
    default the heap's free pages go back to the OS once per step, after the optimizer step: the step's own
    micro-batches and backward pass still reuse each other's memory, and the next step faults its pages in once.
    That bounds the peak (6.6 GB after 40 steps, the lowest of the three) and costs time: run alternately against
    never releasing, the train phase was 7-21 % slower, since its first micro-batch faults the pages in again.

    At long context the heap fragments *within* a pass: each checkpointed layer keeps a multi-MB input and K/V among
    the blocks it frees, and the holes left are not reused well. One 8k-token shared-prompt pass of SmolLM2 grew the
    resident set to 4.1-5.5 GB with every block in the heap and to 2.6 GB with blocks of 8 MiB and more on their own
    pages, for a forward ~20 % slower. ``own_pages_from_mb`` sets that size; at thousands of tokens per pass 8 is a
    good value (``benchmarks/RESULTS.md``, "Long context").

    The setting is process-wide and stays for the life of the process. It is applied at ``setup`` on every rank and
    does nothing where tensors live on an accelerator (their memory has its own caching allocator) or off glibc.

    Args:
        enabled: ``False`` leaves the C library's defaults alone (set ``--host_memory.enabled false`` on the CLI).
        release_every_n_steps: hand the heap's free pages back to the OS after every n-th training step; 0 never
            does (fastest where the heap does not fragment, e.g. fixed-length batches).
        own_pages_from_mb: blocks of at least this many MiB (1 to 32) get their own pages instead of heap memory,
            and are returned on free; ``None`` keeps every block in the heap (fastest at short lengths).
    """

    def __init__(
        self, enabled: bool = True, release_every_n_steps: int = 1, own_pages_from_mb: int | None = None
    ) -> None:
        if release_every_n_steps < 0:
            raise ValueError(f"release_every_n_steps={release_every_n_steps} must be >= 0 (0 never releases)")
        if own_pages_from_mb is not None and not 1 <= own_pages_from_mb <= MAX_MMAP_THRESHOLD_MB:
            raise ValueError(
                f"own_pages_from_mb={own_pages_from_mb} must be 1 to {MAX_MMAP_THRESHOLD_MB} (glibc's limit), or null "
                "to keep every block in the heap"
            )
        self.enabled = enabled
        self.release_every_n_steps = release_every_n_steps
        self.own_pages_from_mb = own_pages_from_mb
        self._active = False

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not self.enabled or trainer.strategy.root_device.type != "cpu":
            return
        self._active = retain_freed_host_memory(self.own_pages_from_mb)
        if not self._active:
            log.info("HostMemoryReuse: the C library is not glibc; freed CPU memory is handled by its own defaults.")

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: object) -> None:
        n = self.release_every_n_steps
        if self._active and n and trainer.global_step % n == 0:
            release_free_host_memory()
