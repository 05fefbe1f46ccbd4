"""Timing and memory measurement for the benchmark: interleaved repeats, device sync, peak memory."""

import ctypes
import gc
import os
import statistics
import threading
import time

import torch


# ----------------------------------------------------------------------------------------------- timing
def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def describe_times(xs):
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def interleaved(fns: dict, repeats: int) -> dict:
    """fns: name -> callable returning seconds (or a value to record). A B C A B C ..., rotating the start."""
    out = {k: [] for k in fns}
    names = list(fns)
    for r in range(repeats):
        order = names[r % len(names):] + names[: r % len(names)]
        for k in order:
            out[k].append(fns[k]())
    return out


def timed(fn, device):
    sync(device)
    t0 = time.perf_counter()
    res = fn()
    sync(device)
    return time.perf_counter() - t0, res


# ----------------------------------------------------------------------------------------------- memory
class _RSSPeak:
    """Peak resident-set size over a block, sampled every ~1 ms from /proc/self/statm (Linux)."""

    def __init__(self):
        self.page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
        self.peak = 0
        self._stop = threading.Event()

    def _rss(self):
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def __enter__(self):
        self.base = self._rss()
        self.peak = self.base
        self._t = threading.Thread(target=self._loop, daemon=True)
        self._t.start()
        return self

    def _loop(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self._rss())

    @property
    def delta(self):
        return self.peak - self.base


def _trim():
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except Exception:  # pragma: no cover - non-glibc
        pass


def peak_memory(fn, device) -> tuple[int, str]:
    _trim()
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base, "cuda max_memory_allocated over the pre-call allocation"
    if not os.path.exists("/proc/self/statm"):
        return -1, "unavailable (needs /proc/self/statm)"
    with _RSSPeak() as m:
        fn()
    return m.delta, "peak RSS increase over the pre-call RSS (sampled every 1 ms, after gc + malloc_trim)"


__all__ = ["describe_times", "interleaved", "peak_memory", "sync", "timed"]
