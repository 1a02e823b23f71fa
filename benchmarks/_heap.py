"""glibc's heap statistics (``mallinfo2``): memory in use and memory free but held, to tell a process that keeps
memory apart from a heap that fragments."""

from __future__ import annotations

import ctypes
import ctypes.util


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost",
    )]  # fmt: skip


def heap_mb() -> tuple[int, int] | None:
    """MB in use and MB free but held by the process (glibc >= 2.33); ``None`` off glibc.

    Free-but-held memory is fragmentation (what ``HostMemoryReuse``'s release returns); in-use memory is something
    the process keeps."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    if not hasattr(libc, "mallinfo2"):
        return None
    libc.mallinfo2.restype = _MallInfo2
    info = libc.mallinfo2()
    return (info.uordblks + info.hblkhd) >> 20, info.fordblks >> 20
