"""s3:// fetching against moto's S3 server: allowlist, errors, retries, versions, cache."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest

from handlers.config import FetchSettings
from handlers.errors import (
    FetchForbidden,
    FetchTimeout,
    ImageError,
    ImageNotFound,
    ImageTooLarge,
    UpstreamUnavailable,
    to_error,
)
from handlers.fetch import Fetcher, S3Source
from tests.fakes import CountingS3, client_error
from tests.images import encode, pattern
from tests.servers import S3Server

PNG = encode(pattern(48, 48))
JPEG = encode(pattern(48, 48, seed=5), "JPEG")


def _bucket() -> str:
    return f"b-{uuid.uuid4().hex[:20]}"


def s3_fetcher(s3: S3Server, **overrides: Any) -> tuple[Fetcher, CountingS3]:
    settings = FetchSettings(**{"s3_allowed_buckets": ["*"], **overrides})
    client = CountingS3(s3.client())
    source = S3Source(settings, lambda: client, backoff_base_s=0.01)
    return Fetcher(settings, {"s3": source}), client


async def test_s3_through_the_standard_aws_environment(
    s3: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("AWS_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in s3.env.items():
        monkeypatch.setenv(name, value)  # AWS_ENDPOINT_URL points boto3 at moto
    url = s3.put(_bucket(), "dir/cat.png", PNG)
    async with Fetcher(FetchSettings(s3_allowed_buckets=["*"])) as f:
        got = await f.fetch(url)
    assert got.data == PNG and got.media_type == "image/png"


async def test_bucket_allowlist(s3: S3Server) -> None:
    bucket = _bucket()
    url = s3.put(bucket, "a.png", PNG)
    f, client = s3_fetcher(s3, s3_allowed_buckets=[])
    async with f:
        with pytest.raises(FetchForbidden) as info:
            await f.fetch(url)
    assert "fetch.s3_allowed_buckets" in info.value.message
    assert "IRIS_FETCH__S3_ALLOWED_BUCKETS" in info.value.message
    assert sum(client.calls.values()) == 0
    f, _ = s3_fetcher(s3, s3_allowed_buckets=[bucket])
    async with f:
        assert (await f.fetch(url)).data == PNG


async def test_size_checked_by_head_before_any_get(s3: S3Server) -> None:
    url = s3.put(_bucket(), "big.png", PNG + bytes(5000))
    f, client = s3_fetcher(s3, max_image_bytes=len(PNG))
    async with f:
        with pytest.raises(ImageTooLarge):
            await f.fetch(url)
    assert client.calls["head_object"] == 1 and client.calls["get_object"] == 0


async def test_body_capped_while_streaming(s3: S3Server) -> None:
    """Even if S3's headers understate the size, the read stops at the cap."""
    url = s3.put(_bucket(), "liar.png", PNG + bytes(3 << 20))
    f, client = s3_fetcher(s3, max_image_bytes=200_000)

    def understate(resp: dict[str, Any]) -> dict[str, Any]:
        return {**resp, "ContentLength": 10}

    client.rewrite["head_object"] = understate
    client.rewrite["get_object"] = understate
    async with f:
        with pytest.raises(ImageTooLarge):
            await f.fetch(url)
    assert client.calls["get_object"] == 1


@pytest.mark.parametrize(
    ("make_url", "match"),
    [
        (lambda s3: s3.put(_bucket(), "x.png", PNG).replace("x.png", "missing.png"),
         r"s3://b-\w+/missing.png does not exist"),
        (lambda s3: f"s3://{_bucket()}/x.png", r"bucket 'b-\w+' does not exist"),
    ],
    ids=["NoSuchKey", "NoSuchBucket"],
)
async def test_missing_objects_are_clear_4xx(s3: S3Server, make_url: Any, match: str) -> None:
    f, client = s3_fetcher(s3)
    async with f:
        with pytest.raises(ImageNotFound, match=match) as info:
            await f.fetch(make_url(s3))
    err = to_error(info.value)
    assert err.status == 400 and err.code == "image_not_found" and err.message == info.value.message
    assert client.calls["get_object"] == 1  # asked once, to learn which thing is missing


@pytest.mark.parametrize("operation", ["head_object", "get_object"])
async def test_access_denied_is_a_clear_4xx(s3: S3Server, operation: str) -> None:
    url = s3.put(_bucket(), "secret.png", PNG)
    f, client = s3_fetcher(s3)
    code = "403" if operation == "head_object" else "AccessDenied"
    client.fail[operation] = [client_error(code, 403)]
    async with f:
        with pytest.raises(FetchForbidden, match="denied") as info:
            await f.fetch(url)
    assert to_error(info.value).status == 400 and client.calls[operation] == 1


@pytest.mark.parametrize(
    ("code", "status"),
    [("SlowDown", 503), ("503", 503), ("Throttling", 400), ("RequestTimeout", 400),
     ("InternalError", 500)],
)
async def test_throttling_and_5xx_are_retried(s3: S3Server, code: str, status: int) -> None:
    url = s3.put(_bucket(), "busy.png", PNG)
    f, client = s3_fetcher(s3)
    client.fail["get_object"] = [client_error(code, status), client_error(code, status)]
    async with f:
        assert (await f.fetch(url)).data == PNG
    assert client.calls["get_object"] == 3


async def test_retries_stop_before_the_deadline(s3: S3Server) -> None:
    url = s3.put(_bucket(), "down.png", PNG)
    # Two seconds: the last attempt starts at least 0.2 s before the deadline, more than a
    # loaded CI machine's stalls (0.5 s once left too little).
    settings = FetchSettings(s3_allowed_buckets=["*"], total_timeout_s=2.0)
    client = CountingS3(s3.client())
    client.fail["head_object"] = [client_error("SlowDown", 503) for _ in range(100)]
    source = S3Source(settings, lambda: client, max_attempts=100, backoff_base_s=0.05,
                      backoff_max_s=0.2)
    async with Fetcher(settings, {"s3": source}) as f:
        with pytest.raises((UpstreamUnavailable, FetchTimeout)) as info:
            await f.fetch(url)
    # Stopped retrying before the deadline: S3's own error, not the deadline's timeout.
    assert isinstance(info.value, UpstreamUnavailable) and info.value.status == 502
    assert "SlowDown" in info.value.message
    assert 3 <= client.calls["head_object"] < 100


async def test_other_client_errors_are_502_without_retry(s3: S3Server) -> None:
    url = s3.put(_bucket(), "creds.png", PNG)
    f, client = s3_fetcher(s3)
    client.fail["head_object"] = [client_error("InvalidAccessKeyId", 403)]
    async with f:
        with pytest.raises(UpstreamUnavailable) as info:
            await f.fetch(url)
    assert to_error(info.value).status == 502 and client.calls["head_object"] == 1


async def test_version_id_is_honoured(s3: S3Server) -> None:
    bucket = _bucket()
    c = s3.client()
    c.create_bucket(Bucket=bucket)
    c.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    v1 = c.put_object(Bucket=bucket, Key="pic", Body=PNG)["VersionId"]
    v2 = c.put_object(Bucket=bucket, Key="pic", Body=JPEG)["VersionId"]
    f, _ = s3_fetcher(s3)
    async with f:
        assert (await f.fetch(f"s3://{bucket}/pic?versionId={v1}")).data == PNG
        assert (await f.fetch(f"s3://{bucket}/pic?versionId={v2}")).data == JPEG
        assert (await f.fetch(f"s3://{bucket}/pic")).data == JPEG
        assert f.stats()["entries"] == 2  # v2 and the latest share one copy of the bytes
        with pytest.raises(ImageNotFound):
            await f.fetch(f"s3://{bucket}/pic?versionId=nope{v1[4:]}")


async def test_sixteen_concurrent_fetches_make_one_get(s3: S3Server) -> None:
    url = s3.put(_bucket(), "hot.png", PNG)
    f, client = s3_fetcher(s3)
    async with f:
        got = await asyncio.gather(*(f.fetch(url) for _ in range(16)))
        stats = f.stats()
    assert all(g.data == PNG for g in got)
    assert client.calls["get_object"] == 1 and client.calls["head_object"] == 1
    assert stats["coalesced"] == 15


async def test_cache_validated_by_etag(s3: S3Server) -> None:
    bucket = _bucket()
    url = s3.put(bucket, "pic.png", PNG)
    f, client = s3_fetcher(s3)
    async with f:
        assert (await f.fetch(url)).data == PNG
        assert (await f.fetch(url)).data == PNG
        assert client.calls["get_object"] == 1 and client.calls["head_object"] == 2
        assert f.stats()["hits"] == 1 and f.stats()["misses"] == 1
        s3.put(bucket, "pic.png", JPEG)  # new ETag: the cached bytes are stale
        assert (await f.fetch(url)).data == JPEG
        assert client.calls["get_object"] == 2
        stats = f.stats()
    assert stats["hits"] == 1 and stats["misses"] == 2
    assert stats["bytes"] == len(PNG) + len(JPEG)


async def test_deleted_object_not_served_from_cache(s3: S3Server) -> None:
    bucket = _bucket()
    url = s3.put(bucket, "gone.png", PNG)
    f, _ = s3_fetcher(s3)
    async with f:
        await f.fetch(url)
        s3.client().delete_object(Bucket=bucket, Key="gone.png")
        with pytest.raises(ImageNotFound):
            await f.fetch(url)


@pytest.mark.parametrize("url", ["s3://user@bucket/k.png", "s3://bucket:9000/k.png",
                                 "s3:///k.png", "s3://bucket/"])
async def test_malformed_s3_urls_are_400(s3: S3Server, url: str) -> None:
    f, client = s3_fetcher(s3)
    async with f:
        with pytest.raises(ImageError) as info:
            await f.fetch(url)
    assert info.value.status == 400 and sum(client.calls.values()) == 0


async def _until(condition: Any, what: str) -> None:
    """Wait for a condition (a guard against hanging, not a timing assertion)."""
    async def poll() -> None:
        while not condition():  # noqa: ASYNC110 (set by server threads, not the loop)
            await asyncio.sleep(0.01)
    try:
        await asyncio.wait_for(poll(), 60)
    except TimeoutError:
        raise AssertionError(f"never: {what}") from None


def _proxy_client(s3: S3Server, endpoint: str) -> Any:
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing",
                        aws_secret_access_key="testing", region_name="us-east-1")


async def test_hung_s3_reads_do_not_delay_a_healthy_fetch(s3: S3Server) -> None:
    """Eight reads that hang after their first bytes hold eight threads; a ninth fetch, from
    another bucket, still completes while all eight hang (the source's own pool, and no
    bucket may take more than half of it)."""
    from tests.servers import HangingS3Proxy

    hung, healthy = _bucket(), _bucket()
    for i in range(8):
        s3.put(hung, f"k{i}.png", PNG)
    ok_url = s3.put(healthy, "ok.png", JPEG)
    proxy = HangingS3Proxy(s3.endpoint, hung)
    settings = FetchSettings(s3_allowed_buckets=["*"], read_timeout_s=120, total_timeout_s=120)
    client = _proxy_client(s3, proxy.endpoint)
    fetcher = Fetcher(settings, {"s3": S3Source(settings, lambda: client)})
    stuck = [asyncio.ensure_future(fetcher.fetch(f"s3://{hung}/k{i}.png")) for i in range(8)]
    try:
        await _until(lambda: proxy.holding == 8, "eight reads hanging at once")
        got = await asyncio.wait_for(fetcher.fetch(ok_url), 60)
        assert got.data == JPEG
        assert proxy.holding == 8 and not any(t.done() for t in stuck)
    finally:
        proxy.release()
        await asyncio.gather(*stuck, return_exceptions=True)
        proxy.close()
        await fetcher.aclose()


async def test_hung_dns_look_ups_do_not_delay_an_s3_fetch(
    s3: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """getaddrinfo blocks; look-ups that hang hold DNS threads only, never S3's."""
    import socket
    import threading

    from handlers.fetch import HttpSource

    release = threading.Event()
    waiting: list[str] = []
    real = socket.getaddrinfo

    def getaddrinfo(host: str, *args: Any, **kwargs: Any) -> Any:
        if host.endswith(".hang.test"):
            waiting.append(host)
            release.wait(60)
            raise OSError("no such host")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    url = s3.put(_bucket(), "ok.png", PNG)
    settings = FetchSettings(s3_allowed_buckets=["*"], connect_timeout_s=60,
                             total_timeout_s=120, dns_threads=8)
    client = s3.client()
    fetcher = Fetcher(settings, {"http": HttpSource(settings),
                                 "s3": S3Source(settings, lambda: client)})
    stuck = [asyncio.ensure_future(fetcher.fetch(f"http://h{i}.hang.test/x.png"))
             for i in range(8)]
    try:
        await _until(lambda: len(waiting) == 8, "eight look-ups hanging at once")
        assert (await asyncio.wait_for(fetcher.fetch(url), 60)).data == PNG
        assert not any(t.done() for t in stuck)
    finally:
        release.set()
        await asyncio.gather(*stuck, return_exceptions=True)
        await fetcher.aclose()
