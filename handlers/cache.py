"""The fetcher's replica-wide cache: content-addressed, LRU by bytes, plus single-flight.

Bytes are stored once per content hash (sha256). Source keys, e.g. ("s3", bucket, key,
version) or ("url", url), point at a hash together with a validator (S3 ETag) or an
expiry time, so identical images reached by different URLs share memory.
All methods run on the event loop thread; nothing here needs a lock.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar


class Blob(Protocol):
    @property
    def data(self) -> bytes: ...

    @property
    def sha256(self) -> str: ...


B = TypeVar("B", bound=Blob)
T = TypeVar("T")


@dataclass
class _Entry:
    sha256: str
    validator: str | None
    expires_at: float | None


class ImageCache(Generic[B]):
    """LRU bounded by the total size of the stored bytes; max_bytes=0 disables storing."""

    def __init__(self, max_bytes: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._max = max_bytes
        self._clock = clock
        self._blobs: OrderedDict[str, B] = OrderedDict()
        self._keys: dict[Hashable, _Entry] = {}
        self._keys_of: dict[str, set[Hashable]] = {}
        self._bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def get(self, key: Hashable, validator: str | None = None) -> B | None:
        """The cached blob if `key` is present, unexpired and its validator matches."""
        entry = self._keys.get(key)
        if entry is not None:
            fresh = entry.validator == validator and (
                entry.expires_at is None or self._clock() < entry.expires_at
            )
            blob = self._blobs.get(entry.sha256) if fresh else None
            if blob is not None:
                self._blobs.move_to_end(entry.sha256)
                self.hits += 1
                return blob
            self._forget(key)
        self.misses += 1
        return None

    def put(
        self, key: Hashable, blob: B, validator: str | None = None, ttl_s: float | None = None
    ) -> None:
        size = len(blob.data)
        if size > self._max or (ttl_s is not None and ttl_s <= 0):
            return
        self._forget(key)
        if blob.sha256 in self._blobs:
            self._blobs.move_to_end(blob.sha256)
        else:
            self._blobs[blob.sha256] = blob
            self._bytes += size
        expires = None if ttl_s is None else self._clock() + ttl_s
        self._keys[key] = _Entry(blob.sha256, validator, expires)
        self._keys_of.setdefault(blob.sha256, set()).add(key)
        while self._bytes > self._max:
            self._evict_oldest()

    def _forget(self, key: Hashable) -> None:
        entry = self._keys.pop(key, None)
        if entry is not None:
            keys = self._keys_of.get(entry.sha256)
            if keys is not None:
                keys.discard(key)

    def _evict_oldest(self) -> None:
        sha, blob = self._blobs.popitem(last=False)
        self._bytes -= len(blob.data)
        self.evictions += 1
        for key in self._keys_of.pop(sha, set()):
            self._keys.pop(key, None)

    def stats(self) -> dict[str, int]:
        return {
            "hits": self.hits,
            "misses": self.misses,
            "bytes": self._bytes,
            "entries": len(self._blobs),
            "keys": len(self._keys),
            "evictions": self.evictions,
            "max_bytes": self._max,
        }


def http_cache_ttl(cache_control: str, max_ttl_s: float) -> float:
    """Seconds a shared cache may keep an HTTP response: 0 for no-store/no-cache/private."""
    directives = {d.strip().split("=", 1)[0].lower(): d for d in cache_control.split(",")}
    if {"no-store", "no-cache", "private"} & directives.keys():
        return 0.0
    if "max-age" in directives:
        value = directives["max-age"].split("=", 1)[-1].strip().strip('"')
        return min(max_ttl_s, float(value)) if value.isdigit() else 0.0
    return max_ttl_s


class SingleFlight:
    """Concurrent calls with the same key share one run of the work.

    The work runs in its own task, so a caller that gives up (cancelled, its own deadline)
    does not cancel it for the others; the work must bound its own run time.
    """

    def __init__(self) -> None:
        self._running: dict[Hashable, asyncio.Task[Any]] = {}
        self.coalesced = 0

    async def run(self, key: Hashable, work: Callable[[], Awaitable[T]]) -> T:
        task = self._running.get(key)
        if task is None:
            task = asyncio.ensure_future(work())
            self._running[key] = task
            task.add_done_callback(lambda t: self._done(key, t))
        else:
            self.coalesced += 1
        return await asyncio.shield(task)

    def _done(self, key: Hashable, task: asyncio.Task[Any]) -> None:
        if self._running.get(key) is task:
            del self._running[key]
        if not task.cancelled():
            task.exception()  # mark retrieved: no "never retrieved" noise if all callers left

    def __len__(self) -> int:
        return len(self._running)


class SizedLRU(Generic[T]):
    """A plain LRU of values bounded by the sizes the caller gives; max_bytes=0 stores nothing.
    Used for results derived from content (e.g. resized pixels keyed by hash and size)."""

    def __init__(self, max_bytes: int) -> None:
        self._max = max_bytes
        self._items: OrderedDict[Hashable, tuple[T, int]] = OrderedDict()
        self._bytes = 0
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable) -> T | None:
        item = self._items.get(key)
        if item is None:
            self.misses += 1
            return None
        self._items.move_to_end(key)
        self.hits += 1
        return item[0]

    def put(self, key: Hashable, value: T, size: int) -> None:
        if size > self._max:
            return
        old = self._items.pop(key, None)
        if old is not None:
            self._bytes -= old[1]
        self._items[key] = (value, size)
        self._bytes += size
        while self._bytes > self._max:
            _, (_, evicted) = self._items.popitem(last=False)
            self._bytes -= evicted

    def stats(self) -> dict[str, int]:
        return {"hits": self.hits, "misses": self.misses, "bytes": self._bytes,
                "entries": len(self._items), "max_bytes": self._max}
