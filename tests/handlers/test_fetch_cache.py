"""The replica-wide cache (LRU by bytes, validators, TTL) and single-flight."""

from __future__ import annotations

import asyncio
import hashlib

import pytest

from handlers.cache import ImageCache, SingleFlight, http_cache_ttl
from handlers.fetch import FetchedImage


def img(data: bytes) -> FetchedImage:
    return FetchedImage(data, "image/png", hashlib.sha256(data).hexdigest())


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_lru_bounded_by_bytes() -> None:
    cache: ImageCache[FetchedImage] = ImageCache(250)
    a, b, c = img(b"a" * 100), img(b"b" * 100), img(b"c" * 100)
    cache.put("a", a)
    cache.put("b", b)
    assert cache.get("a") is a  # a is now most recent
    cache.put("c", c)  # evicts b, the least recently used
    assert cache.get("b") is None and cache.get("a") is a and cache.get("c") is c
    s = cache.stats()
    assert s["bytes"] == 200 and s["entries"] == 2 and s["evictions"] == 1
    assert s["hits"] == 3 and s["misses"] == 1


def test_too_big_or_disabled_is_not_stored() -> None:
    cache: ImageCache[FetchedImage] = ImageCache(50)
    cache.put("k", img(b"x" * 51))
    assert cache.get("k") is None and cache.stats()["bytes"] == 0
    off: ImageCache[FetchedImage] = ImageCache(0)
    off.put("k", img(b"x"))
    assert off.get("k") is None


def test_content_addressed_bytes_stored_once() -> None:
    cache: ImageCache[FetchedImage] = ImageCache(1000)
    one = img(b"same" * 10)
    cache.put(("s3", "b", "k1", None), one, validator="e1")
    cache.put(("url", "http://x/y"), img(b"same" * 10), ttl_s=60)
    assert cache.stats()["bytes"] == 40 and cache.stats()["entries"] == 1
    assert cache.stats()["keys"] == 2
    assert cache.get(("url", "http://x/y")) is one


def test_eviction_drops_every_key_of_the_blob() -> None:
    cache: ImageCache[FetchedImage] = ImageCache(100)
    cache.put("k1", img(b"a" * 60))
    cache.put("k2", img(b"a" * 60))
    cache.put("k3", img(b"b" * 60))
    assert cache.get("k1") is None and cache.get("k2") is None
    assert cache.stats()["keys"] == 1


def test_validator_mismatch_is_a_miss_and_forgets() -> None:
    cache: ImageCache[FetchedImage] = ImageCache(1000)
    cache.put("k", img(b"v1"), validator='"etag1"')
    assert cache.get("k", validator='"etag1"') is not None
    assert cache.get("k", validator='"etag2"') is None
    assert cache.get("k", validator='"etag1"') is None  # the stale entry is gone
    assert cache.stats()["keys"] == 0


def test_ttl_expiry() -> None:
    clock = Clock()
    cache: ImageCache[FetchedImage] = ImageCache(1000, clock=clock)
    cache.put("k", img(b"data"), ttl_s=60)
    cache.put("never", img(b"other"), ttl_s=0)
    clock.now = 59.9
    assert cache.get("k") is not None and cache.get("never") is None
    clock.now = 60.0
    assert cache.get("k") is None


async def test_single_flight_shares_one_run() -> None:
    flight = SingleFlight()
    runs = 0
    gate = asyncio.Event()

    async def work() -> int:
        nonlocal runs
        runs += 1
        await gate.wait()
        return 42

    tasks = [asyncio.create_task(flight.run("k", work)) for _ in range(16)]
    await asyncio.sleep(0)
    gate.set()
    assert await asyncio.gather(*tasks) == [42] * 16
    assert runs == 1 and flight.coalesced == 15 and len(flight) == 0
    assert await flight.run("k", work) == 42 and runs == 2  # done: the next call runs anew


async def test_single_flight_shares_errors_and_survives_a_caller_leaving() -> None:
    flight = SingleFlight()
    gate = asyncio.Event()

    async def work() -> int:
        await gate.wait()
        raise ValueError("boom")

    leaver = asyncio.create_task(flight.run("k", work))
    stayer = asyncio.create_task(flight.run("k", work))
    await asyncio.sleep(0)
    leaver.cancel()  # one caller gives up; the shared work must go on for the other
    await asyncio.sleep(0)
    gate.set()
    with pytest.raises(ValueError, match="boom"):
        await stayer
    assert leaver.cancelled()


@pytest.mark.parametrize(
    ("header", "ttl"),
    [("", 60.0), ("public, max-age=30", 30.0), ("max-age=86400", 60.0), ("no-store", 0.0),
     ("no-cache", 0.0), ("private, max-age=600", 0.0), ("max-age=junk", 0.0)],
)
def test_http_cache_ttl(header: str, ttl: float) -> None:
    assert http_cache_ttl(header, 60.0) == ttl


def test_sized_lru_evicts_least_recent_by_size() -> None:
    from handlers.cache import SizedLRU

    lru: SizedLRU[str] = SizedLRU(10)
    lru.put("a", "A", 4)
    lru.put("b", "B", 4)
    assert lru.get("a") == "A"  # a is now the most recent
    lru.put("c", "C", 4)  # 12 > 10: evicts b, the least recent
    assert lru.get("b") is None and lru.get("a") == "A" and lru.get("c") == "C"
    lru.put("huge", "H", 11)  # larger than the whole cache: not stored
    assert lru.get("huge") is None
    assert lru.stats()["bytes"] == 8 and lru.stats()["hits"] == 3
    assert SizedLRU[str](0).get("x") is None
