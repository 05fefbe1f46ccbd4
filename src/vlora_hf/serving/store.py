"""Adapters on a RAM-backed folder, one per distinct image, under a byte cap with LRU eviction.

vLLM loads a LoRA adapter from a path; a RAM-backed folder (/dev/shm) makes that a memory copy. An adapter that a
request still uses is pinned and never evicted; when the pinned ones alone would pass the cap, `put` refuses
(`StoreFull`) rather than grow. Every adapter is written to a temp folder and renamed into place, so vLLM never
sees half an adapter, and a failed write leaves nothing behind.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

NULL_KEY = "null"
NAME_PREFIX = "vlora-image-"


class StoreFull(RuntimeError):
    """Every adapter in the store is in use and a new one would pass the byte cap."""


@dataclass
class Adapter:
    key: str
    name: str  # the LoRA name vLLM knows it by
    int_id: int  # vLLM's adapter id: never reused, so an evicted and rewritten adapter is loaded afresh
    path: Path
    nbytes: int
    pins: int = 0


def ram_folder() -> str | None:
    """/dev/shm when it is a writable folder (Linux), else None (the system temp folder)."""
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


class AdapterStore:
    """Adapters keyed by image content hash. Thread-safe.

    `min_free_bytes`: writing stops (StoreFull) before the folder's file system would fall under this much free
    space, whatever the cap says — the store never fills a disk or RAM.
    """

    def __init__(self, max_bytes: int, root=None, min_free_bytes: int = 256 << 20,
                 on_evict: Callable[[Adapter], None] | None = None):
        if max_bytes <= 0:
            raise ValueError(f"the adapter store needs a positive byte cap, got {max_bytes}")
        self.max_bytes = max_bytes
        self.min_free_bytes = min_free_bytes
        self.on_evict = on_evict
        self.root = Path(tempfile.mkdtemp(prefix="vlora-adapters-", dir=root or ram_folder()))
        self._entries: OrderedDict[str, Adapter] = OrderedDict()
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self.writes = 0  # adapters written so far (tests: the same image twice writes once)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self._entries.values())

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def acquire(self, key: str) -> Adapter | None:
        """The adapter stored under `key`, pinned (call `release`), or None."""
        with self._lock:
            adapter = self._entries.get(key)
            if adapter is not None:
                adapter.pins += 1
                self._entries.move_to_end(key)
            return adapter

    def release(self, adapter: Adapter) -> None:
        with self._lock:
            adapter.pins = max(0, adapter.pins - 1)

    def put(self, key: str, write: Callable[[Path], None], nbytes: int) -> Adapter:
        """Store the adapter `write(folder)` writes (`nbytes`, its size), pinned; an existing one is reused."""
        existing = self.acquire(key)
        if existing is not None:
            return existing
        with self._lock:
            self._make_room(nbytes)
        tmp = Path(tempfile.mkdtemp(prefix=".writing-", dir=self.root))
        try:
            write(tmp)
            size = sum(f.stat().st_size for f in tmp.iterdir())
            with self._lock:
                if key in self._entries:  # another thread stored the same image meanwhile
                    adapter = self._entries[key]
                    adapter.pins += 1
                    shutil.rmtree(tmp, ignore_errors=True)
                    return adapter
                int_id = next(self._ids)
                name = key if key == NULL_KEY else f"{NAME_PREFIX}{key}"
                path = self.root / f"{int_id}-{key}"
                os.rename(tmp, path)
                adapter = Adapter(key=key, name=f"{name}-{int_id}", int_id=int_id, path=path, nbytes=size, pins=1)
                self._entries[key] = adapter
                self.writes += 1
                return adapter
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def discard(self, adapter: Adapter) -> None:
        """Remove `adapter` now unless a request still uses it."""
        with self._lock:
            if adapter.pins == 0 and self._entries.get(adapter.key) is adapter:
                self._evict(adapter)

    def _make_room(self, nbytes: int) -> None:
        """Evict least recently used unpinned adapters until `nbytes` more fit under the cap and the free-space
        floor; StoreFull when they cannot (lock held)."""
        def fits():
            free = shutil.disk_usage(self.root).free
            return self.nbytes + nbytes <= self.max_bytes and free - nbytes >= self.min_free_bytes

        for key in list(self._entries):
            if fits():
                return
            adapter = self._entries[key]
            if adapter.pins == 0:
                self._evict(adapter)
        if not fits():
            in_use = sum(a.nbytes for a in self._entries.values())
            raise StoreFull(
                f"the adapter store is full: {len(self._entries)} adapters in use hold {in_use} bytes, the cap is "
                f"{self.max_bytes} bytes and {shutil.disk_usage(self.root).free} bytes are free in {self.root}; "
                "raise the cap or lower the number of images in flight"
            )

    def _evict(self, adapter: Adapter) -> None:
        del self._entries[adapter.key]
        shutil.rmtree(adapter.path, ignore_errors=True)
        if self.on_evict is not None:
            self.on_evict(adapter)

    def close(self) -> None:
        """Remove every adapter and the store's folder."""
        with self._lock:
            self._entries.clear()
            shutil.rmtree(self.root, ignore_errors=True)
