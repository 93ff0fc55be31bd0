"""This machine's memory as an engine sees it: what is available, what this process holds, and the
margin left free. One gauge for every memory decision: `tune` keeping engines open at once
(checks/tuning.py's `Room`) and a server's warm-up keeping compiled batch sizes
(core/runtime/generator.py's `warm_up`)."""

from __future__ import annotations

import ctypes
import gc
from contextlib import suppress
from pathlib import Path

GIB = 1 << 30


def proc_bytes(path: str, key: str) -> int | None:
    """A `key: N kB` line of a /proc file, in bytes; None where there is none (not Linux)."""
    try:
        for line in Path(path).read_text().splitlines():
            name, _, value = line.partition(":")
            if name == key:
                return int(value.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


class MemoryGauge:
    """This machine's available memory and this process's anonymous resident memory (what an open
    engine holds: its weights, arenas and compiled kernels; file-backed pages, such as an mmap'd IR,
    are page cache the kernel can drop, counted as available), from /proc; None where it cannot
    tell (not Linux): then memory bounds nothing."""

    def available(self) -> int | None:
        return proc_bytes("/proc/meminfo", "MemAvailable")

    def total(self) -> int | None:
        return proc_bytes("/proc/meminfo", "MemTotal")

    def resident(self) -> int | None:
        return proc_bytes("/proc/self/status", "RssAnon") or proc_bytes("/proc/self/status", "VmRSS")

    def margin(self) -> int:
        """Bytes to leave free: a tenth of the machine, at least 1 GiB (transient peaks such as
        OpenVINO's compilation, other processes)."""
        return max(GIB, (self.total() or 0) // 10)

    def room_for(self, need: float) -> bool:
        """Whether `need` more bytes fit in the available memory less the margin (yes where the
        gauge cannot tell)."""
        available = self.available()
        return available is None or available - self.margin() >= need

    def release(self) -> None:
        """Give closed engines' memory back: collect the cycles ORT/OpenVINO/torch objects sit in, and
        have glibc return its freed heap to the system (else MemAvailable would not see it)."""
        gc.collect()
        with suppress(OSError, AttributeError):  # not glibc: freed memory stays with the process, reused
            ctypes.CDLL("libc.so.6").malloc_trim(0)
