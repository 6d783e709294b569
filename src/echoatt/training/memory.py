"""Memory measured as a batch size is chosen by it: each figure from a clean allocator, its peak above where it
started — CUDA's own counters on a GPU, the resident high-water mark on Linux CPUs (reset through /proc/self/clear_refs;
glibc's freed heap handed back first, or memory reused from it would never show)."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
from pathlib import Path
from typing import Self

import torch


@functools.cache
def _malloc_trim():
    """glibc's `malloc_trim` from the running process' own symbols (no library search at import), or None where
    the C library has none (macOS, musl) or the process exposes no symbols (Windows)."""
    try:
        return getattr(ctypes.CDLL(None), "malloc_trim", None)
    except (OSError, TypeError):
        return None


def free_memory(device: torch.device) -> None:
    """Unreferenced tensors freed and their memory handed back: to the driver on a GPU; on a CPU, glibc's free pages
    to the kernel (`malloc_trim`), else memory reused from malloc's heap would never show in the resident high-water
    mark, and a small peak measured after larger work reads as zero."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif (trim := _malloc_trim()) is not None:
        trim(0)


def reset_peak_memory(device: torch.device) -> None:
    """Restart `peak_memory_bytes` from what is in use now (the CUDA allocator's peak counter, or the resident
    high-water mark through /proc/self/clear_refs on Linux), so a peak read later is that work's, not the process's
    whole history (a `run`'s analysis, calibration and local repair before its distillation)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    with contextlib.suppress(OSError):
        PeakMemory.CLEAR.write_text("5")


def peak_memory_bytes(device: torch.device) -> int | None:
    """The process's peak memory since the last `reset_peak_memory`: the CUDA allocator's counter on a GPU, else the
    resident high-water mark (Linux); None where neither can be read."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        return PeakMemory(device)._resident("VmHWM")
    except (OSError, StopIteration):
        return None


class PeakMemory:
    """Peak bytes in use above the start of a `with` block (`.bytes`): the CUDA caching allocator's own counter on a
    GPU; on Linux CPUs the process's resident high-water mark, reset through /proc/self/clear_refs (large tensors are
    mapped and unmapped whole, so it follows them); None where neither can be read."""

    STATUS, CLEAR = Path("/proc/self/status"), Path("/proc/self/clear_refs")

    def __init__(self, device: torch.device):
        self.device, self.bytes = device, None

    def _resident(self, field: str) -> int:
        line = next(x for x in self.STATUS.read_text().splitlines() if x.startswith(field + ":"))
        return int(line.split()[1]) * 1024

    def __enter__(self) -> Self:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        free_memory(self.device)  # from a clean allocator
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            try:
                self.CLEAR.write_text("5")  # the high-water mark restarts at what is resident now
                self.start = self._resident("VmRSS")
            except OSError:
                self.start = None
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = torch.cuda.max_memory_allocated(self.device) - self.start
        elif self.start is not None:
            self.bytes = max(0, self._resident("VmHWM") - self.start)
