"""s3://bucket/key[?versionId=...] images through boto3's standard credential chain."""

from __future__ import annotations

import asyncio
import random
import re
import threading
import time
import urllib.parse
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from handlers.capped import CappedBuffer
from handlers.config import FetchSettings
from handlers.errors import (
    FetchForbidden,
    FetchTimeout,
    ImageError,
    ImageNotFound,
    ImageTooLarge,
    UpstreamUnavailable,
)
from handlers.media import Cache, FetchedImage, finish

_CHUNK = 64 << 10


_BUCKET = re.compile(r"^[a-z0-9][a-z0-9._-]{0,254}$", re.IGNORECASE)  # no user@, no port


def parse_s3_url(url: str) -> tuple[str, str, str | None]:
    parts = urllib.parse.urlsplit(url)
    bucket = parts.netloc
    key = urllib.parse.unquote(parts.path.lstrip("/"))
    if not bucket or not key or not _BUCKET.match(bucket):
        raise ImageError("An s3:// image URL must be s3://bucket/key.")
    version = urllib.parse.parse_qs(parts.query).get("versionId", [None])[0]
    return bucket, key, version


_S3_RETRY_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded",
    "TooManyRequestsException", "RequestTimeout", "RequestTimeoutException",
    "ServiceUnavailable", "InternalError", "503", "500", "502", "504",
})


def _s3_error(exc: Exception, bucket: str, key: str, version: str | None) -> tuple[bool, Exception]:
    """(retryable, client-facing error) for a botocore exception."""
    from botocore.exceptions import (
        ClientError,
        ConnectionError,
        HTTPClientError,
        IncompleteReadError,
        NoCredentialsError,
        ParamValidationError,
    )

    where = f"s3://{bucket}/{key}"
    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        if code in ("NoSuchKey", "NotFound", "404"):
            return False, ImageNotFound(f"The S3 object {where} does not exist.")
        if code == "NoSuchVersion" or (code == "InvalidArgument" and version):
            return False, ImageNotFound(f"The S3 object {where} has no version {version!r}.")
        if code == "NoSuchBucket":
            return False, ImageNotFound(f"The S3 bucket {bucket!r} does not exist.")
        if code in ("AccessDenied", "403", "Forbidden", "AllAccessDisabled"):
            return False, FetchForbidden(
                f"Access to {where} was denied (S3 also says this for a missing key when "
                "the credentials may not list the bucket)."
            )
        if code in ("MethodNotAllowed", "405"):  # the version is a delete marker
            return False, ImageNotFound(f"The S3 object {where} has been deleted.")
        safe = re.sub(r"[^A-Za-z0-9]", "", code)[:40] or str(status)
        retry = code in _S3_RETRY_CODES or status >= 500 or status == 429
        return retry, UpstreamUnavailable(f"S3 could not return {where} ({safe}).")
    if isinstance(exc, ParamValidationError):
        return False, ImageError("The s3:// image URL is not valid.")
    if isinstance(exc, NoCredentialsError):
        return False, UpstreamUnavailable("No AWS credentials are configured for S3.")
    if isinstance(exc, ConnectionError | HTTPClientError | IncompleteReadError):
        return True, UpstreamUnavailable("S3 could not be reached.")
    return False, UpstreamUnavailable("S3 could not return the image.")


class S3Source:
    """s3://bucket/key[?versionId=...] through boto3's standard credential chain.

    Blocking boto3 calls run in a thread pool of the source's own (fetch.s3_threads), never
    asyncio's default one, which DNS look-ups and everything else share; one bucket may hold
    at most half of it, so a hung bucket cannot starve fetches from the others. Retries
    (throttling, 5xx, connection errors) are ours, with exponential backoff and jitter, and
    stop before the fetch deadline; the read loop checks the deadline between chunks.
    """

    def __init__(
        self,
        settings: FetchSettings,
        client_factory: Callable[[], Any] | None = None,
        *,
        max_attempts: int = 6,
        backoff_base_s: float = 0.1,
        backoff_max_s: float = 2.0,
    ) -> None:
        self._s = settings
        self._factory = client_factory or (lambda: default_s3_client(settings))
        self._client: Any = None
        self._lock = threading.Lock()
        self._max_attempts = max_attempts
        self._base = backoff_base_s
        self._max_backoff = backoff_max_s
        self._pool = ThreadPoolExecutor(settings.s3_threads, thread_name_prefix="iris-s3")
        self._per_bucket = max(1, settings.s3_threads // 2)
        self._buckets: dict[str, asyncio.Semaphore] = {}

    def _get_client(self) -> Any:
        with self._lock:  # one client per replica; boto3 clients are thread-safe to share
            if self._client is None:
                self._client = self._factory()
            return self._client

    def _bucket_slots(self, bucket: str) -> asyncio.Semaphore:
        slots = self._buckets.get(bucket)
        if slots is None:
            slots = self._buckets[bucket] = asyncio.Semaphore(self._per_bucket)
        return slots

    async def get(self, url: str, cache: Cache) -> FetchedImage:
        bucket, key, version = parse_s3_url(url)
        allowed = self._s.s3_allowed_buckets
        if "*" not in allowed and bucket not in allowed:
            raise FetchForbidden(
                f"S3 bucket {bucket!r} is not allowed; add it to fetch.s3_allowed_buckets "
                "(IRIS_FETCH__S3_ALLOWED_BUCKETS)."
            )
        deadline = time.monotonic() + self._s.total_timeout_s
        args = (bucket, key, version)
        async with self._bucket_slots(bucket):
            head = await self._retrying(self._head_sync, args, deadline)
            cache_key = ("s3", bucket, key, version)
            if head is not None:
                if int(head.get("ContentLength") or 0) > self._s.max_image_bytes:
                    raise ImageTooLarge.over_cap(self._s.max_image_bytes)
                hit = cache.get(cache_key, validator=head.get("ETag"))
                if hit is not None:
                    return hit
            data, etag = await self._retrying(self._get_sync, args, deadline)
        image = finish(data)
        cache.put(cache_key, image, validator=etag)
        return image

    async def _retrying(self, fn: Callable[..., Any], args: tuple[str, str, str | None],
                        deadline: float) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        loop = asyncio.get_running_loop()
        # An attempt is expected to take twice the slowest so far, and never less than a tenth
        # of the fetch's budget: a retry squeezed into the deadline's last moments would most
        # likely end in the deadline's timeout instead of S3's own, more telling, error.
        floor = self._s.total_timeout_s / 10
        slowest = 0.0
        for attempt in range(self._max_attempts):
            started = time.monotonic()
            try:
                return await loop.run_in_executor(self._pool, fn, *args, deadline)
            except (ClientError, BotoCoreError) as exc:
                retry, error = _s3_error(exc, *args)
                if not retry or attempt + 1 >= self._max_attempts:
                    raise error from exc
                # Exponential backoff with equal jitter; no attempt that would end past the
                # fetch deadline: the client gets S3's error rather than the deadline's timeout.
                step = min(self._max_backoff, self._base * 2**attempt)
                delay = step / 2 + random.uniform(0, step / 2)
                now = time.monotonic()
                slowest = max(slowest, now - started)
                if now + delay + max(2 * slowest, floor) >= deadline:
                    raise error from exc
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    def _head_sync(
        self, bucket: str, key: str, version: str | None, deadline: float
    ) -> dict[str, Any] | None:
        from botocore.exceptions import ClientError

        extra = {"VersionId": version} if version else {}
        try:
            head: dict[str, Any] = self._get_client().head_object(Bucket=bucket, Key=key, **extra)
            return head
        except ClientError as exc:
            # A HEAD 404 has no body, so it cannot say NoSuchKey from NoSuchBucket;
            # return None and let the GET report precisely.
            if exc.response.get("Error", {}).get("Code") in ("404", "NotFound"):
                return None
            raise

    def _get_sync(
        self, bucket: str, key: str, version: str | None, deadline: float
    ) -> tuple[bytes, str | None]:
        cap = self._s.max_image_bytes
        extra = {"VersionId": version} if version else {}
        obj = self._get_client().get_object(Bucket=bucket, Key=key, **extra)
        body = obj["Body"]
        data = CappedBuffer(cap, lambda: ImageTooLarge.over_cap(cap))
        try:
            data.check_declared(int(obj.get("ContentLength") or 0))
            while chunk := body.read(_CHUNK):  # capped while streaming, whatever S3 said
                data.add(chunk)
                # A slow body ends at the fetch deadline (each read is bounded by
                # fetch.read_timeout_s): the thread is not held past it.
                if time.monotonic() > deadline:
                    raise FetchTimeout(
                        f"Fetching the image took longer than {self._s.total_timeout_s:g} s."
                    )
        finally:
            body.close()
        return data.getvalue(), obj.get("ETag")


def default_s3_client(settings: FetchSettings) -> Any:
    import boto3
    from botocore.config import Config

    # Region, credentials and AWS_ENDPOINT_URL come from boto3's standard chain; retries
    # are S3Source's own (one attempt here) so they respect the fetch deadline.
    return boto3.session.Session().client("s3", config=Config(
        connect_timeout=settings.connect_timeout_s,
        read_timeout=settings.read_timeout_s,
        retries={"total_max_attempts": 1},
        max_pool_connections=settings.s3_threads,  # one connection per thread
    ))
