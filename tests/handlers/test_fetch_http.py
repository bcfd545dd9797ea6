"""http(s) fetching against a real loopback server: caps, timeouts, redirects, cache."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from handlers.config import FetchSettings
from handlers.errors import (
    FetchForbidden,
    FetchTimeout,
    ImageError,
    ImageNotFound,
    ImageTooLarge,
    UpstreamUnavailable,
)
from handlers.fetch import Fetcher
from tests.images import encode, pattern
from tests.servers import ImageServer

PNG = encode(pattern(64, 64))
JPEG = encode(pattern(64, 64, seed=3), "JPEG")
LOCAL = {"allow_private_networks": True}  # the loopback server is "private"


def _path(suffix: str = ".png") -> str:
    return f"/{uuid.uuid4().hex}{suffix}"


def fetcher(**overrides: object) -> Fetcher:
    return Fetcher(FetchSettings(**{**LOCAL, **overrides}))


async def test_fetch_judges_media_type_from_bytes(image_server: ImageServer) -> None:
    url = image_server.add_bytes(_path(), JPEG, content_type="text/plain")
    async with fetcher() as f:
        got = await f.fetch(url)
    assert got.data == JPEG and got.media_type == "image/jpeg" and len(got.sha256) == 64


async def test_not_an_image(image_server: ImageServer) -> None:
    url = image_server.add_bytes(_path(), b"<html>nope</html>", content_type="image/png")
    async with fetcher() as f:
        with pytest.raises(ImageError, match="did not return an image"):
            await f.fetch(url)


@pytest.mark.parametrize(
    ("status", "error", "http_status"),
    [(404, ImageNotFound, 400), (410, ImageNotFound, 400), (403, FetchForbidden, 400),
     (400, ImageError, 400), (429, UpstreamUnavailable, 502), (503, UpstreamUnavailable, 502)],
)
async def test_status_mapping(
    image_server: ImageServer, status: int, error: type[Exception], http_status: int
) -> None:
    url = image_server.add_status(_path(), status)
    async with fetcher() as f:
        with pytest.raises(error) as info:
            await f.fetch(url)
    assert type(info.value) is error and info.value.status == http_status


async def test_redirects_followed_up_to_five(image_server: ImageServer) -> None:
    target = _path()
    image_server.add_bytes(target, PNG)
    base = uuid.uuid4().hex

    def chain(n: int) -> str:
        nxt = target
        for i in reversed(range(n)):
            path = f"/{base}/{n}/{i}"
            # relative and absolute Locations both work
            image_server.add_redirect(path, nxt if i % 2 else image_server.url(nxt))
            nxt = path
        return image_server.url(nxt)

    async with fetcher(cache_max_bytes=0) as f:
        assert (await f.fetch(chain(5))).data == PNG
        assert image_server.hits[target] == 1
        with pytest.raises(ImageError, match="redirected more than 5 times") as info:
            await f.fetch(chain(6))
    assert info.value.status == 400
    assert image_server.hits[target] == 1  # the sixth hop was never requested
    assert image_server.hits[f"/{base}/6/5"] == 1


async def test_redirect_loop_refused(image_server: ImageServer) -> None:
    path = _path()
    url = image_server.add_redirect(path, path)
    async with fetcher() as f:
        with pytest.raises(ImageError, match="redirected"):
            await f.fetch(url)
    assert image_server.hits[path] == 6


async def test_declared_length_over_cap_refused_before_body(image_server: ImageServer) -> None:
    url = image_server.add_lying_length(_path(), PNG, declared=10_000_000)
    async with fetcher(max_image_bytes=100_000) as f:
        with pytest.raises(ImageTooLarge) as info:
            await f.fetch(url)
    assert info.value.code == "image_too_large"


async def test_lying_small_length_changes_nothing(image_server: ImageServer) -> None:
    # The server claims 100 bytes and sends far more than the cap: we read 100, no more
    # (the truncated PNG then fails to decode in the preprocessor, not here).
    url = image_server.add_lying_length(_path(), PNG + bytes(500_000), declared=100)
    async with fetcher(max_image_bytes=50_000) as f:
        got = await f.fetch(url)
    assert got.data == PNG[:100]


async def test_body_shorter_than_declared_is_an_error(image_server: ImageServer) -> None:
    url = image_server.add_lying_length(_path(), PNG, declared=len(PNG) + 1000)
    async with fetcher() as f:
        with pytest.raises(ImageError, match="broke off") as info:
            await f.fetch(url)
    assert info.value.status == 400


async def test_unannounced_body_stopped_mid_stream(image_server: ImageServer) -> None:
    """No Content-Length at all: the cap alone stops the read, long before the end."""
    path = _path()
    total = 256 << 20
    url = image_server.add_stream(path, PNG, total=total)
    async with fetcher(max_image_bytes=256 << 10) as f:
        with pytest.raises(ImageTooLarge):
            await f.fetch(url)
    assert image_server.sent[path] < total // 4


async def test_trickle_cut_by_total_deadline(image_server: ImageServer) -> None:
    # 64 bytes every 50 ms keeps a 1 s read timeout happy forever; the deadline is not.
    url = image_server.add_trickle(_path(), PNG * 4, delay_s=0.05)
    async with fetcher(read_timeout_s=1.0, total_timeout_s=0.4) as f:
        # The whole-fetch deadline's message, not the read timeout's ("sent nothing").
        with pytest.raises(FetchTimeout, match=r"longer than 0\.4 s") as info:
            await f.fetch(url)
    assert info.value.code == "image_fetch_timeout" and info.value.status == 400


async def test_stall_cut_by_read_timeout(image_server: ImageServer) -> None:
    url = image_server.add_trickle(_path(), PNG, delay_s=1.0)
    async with fetcher(read_timeout_s=0.2, total_timeout_s=5) as f:
        # The read timeout's message, not the 5 s deadline's ("longer than").
        with pytest.raises(FetchTimeout, match="sent nothing"):
            await f.fetch(url)


async def test_slow_dns_cut_by_connect_timeout() -> None:
    from handlers.fetch import HttpSource

    async def slow(host: str, port: int) -> list[str]:
        await asyncio.sleep(5)
        return ["127.0.0.1"]

    s = FetchSettings(connect_timeout_s=0.1, **LOCAL)
    async with Fetcher(s, {"http": HttpSource(s, slow)}) as f:
        with pytest.raises(FetchTimeout):
            await f.fetch("http://slow.example.test/x.png")


async def test_unresolvable_host_is_a_clear_400() -> None:
    from handlers.fetch import HttpSource
    from tests.fakes import FakeResolver

    s = FetchSettings()
    async with Fetcher(s, {"http": HttpSource(s, FakeResolver({}))}) as f:
        with pytest.raises(ImageError, match="could not be resolved") as info:
            await f.fetch("https://nowhere.example.test/x.png")
    assert info.value.status == 400 and info.value.code == "image_unreachable"


async def test_sixteen_concurrent_fetches_make_one_request(image_server: ImageServer) -> None:
    path = _path()
    url = image_server.add_trickle(path, PNG, delay_s=0.002)  # slow enough to overlap
    async with fetcher() as f:
        got = await asyncio.gather(*(f.fetch(url) for _ in range(16)))
        stats = f.stats()
    assert image_server.hits[path] == 1
    assert all(g.data == PNG for g in got)
    assert stats["coalesced"] == 15 and stats["misses"] == 1 and stats["in_flight"] == 0


async def test_url_cache_serves_repeat_fetches(image_server: ImageServer) -> None:
    path = _path()
    url = image_server.add_bytes(path, PNG)
    async with fetcher() as f:
        a = await f.fetch(url)
        b = await f.fetch(url + "#frag")  # same resource
        stats = f.stats()
    assert a is b and image_server.hits[path] == 1
    assert stats["hits"] == 1 and stats["misses"] == 1
    assert stats["bytes"] == len(PNG) and stats["entries"] == 1


@pytest.mark.parametrize("cache_control", ["no-store", "private, max-age=600", "max-age=0"])
async def test_url_cache_respects_cache_control(
    image_server: ImageServer, cache_control: str
) -> None:
    path = _path()
    url = image_server.add_bytes(path, PNG, headers={"Cache-Control": cache_control})
    async with fetcher() as f:
        await f.fetch(url)
        await f.fetch(url)
        assert f.stats()["hits"] == 0
    assert image_server.hits[path] == 2


async def test_failures_are_not_cached(image_server: ImageServer) -> None:
    path = _path()
    url = image_server.add_status(path, 503)
    async with fetcher() as f:
        with pytest.raises(UpstreamUnavailable):
            await f.fetch(url)
        image_server.add_bytes(path, PNG)
        assert (await f.fetch(url)).data == PNG
