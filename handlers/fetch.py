"""URL -> image bytes, media type and content hash. Owns where bytes may come from."""

from __future__ import annotations

import asyncio
import binascii
import hashlib
import re
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import pybase64

from handlers.config import FetchSettings
from handlers.errors import (
    FetchForbidden,
    FetchTimeout,
    ImageError,
    ImageNotFound,
    ImageTooLarge,
    UpstreamUnavailable,
)


@dataclass(frozen=True)
class FetchedImage:
    data: bytes
    media_type: str
    sha256: str


def sniff_media_type(data: bytes) -> str | None:
    """Judge the media type from the bytes, never from a header."""
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data.startswith(b"BM"):
        return "image/bmp"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "image/tiff"
    return None


def finish(data: bytes) -> FetchedImage:
    media_type = sniff_media_type(data)
    if media_type is None:
        raise ImageError("The URL did not return an image (JPEG, PNG, WebP, GIF, BMP or TIFF).")
    return FetchedImage(data, media_type, hashlib.sha256(data).hexdigest())


_DATA_URI = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[^;,]*)*)"
                       r"(?P<b64>;base64)?,", re.IGNORECASE)


def decode_data_uri(url: str, max_bytes: int) -> bytes:
    """Strict base64 `data:` URI decoding with a size cap checked before decoding."""
    m = _DATA_URI.match(url)
    if m is None or not m.group("b64"):
        raise ImageError("A data: image URL must be of the form data:image/<type>;base64,<data>.")
    payload = url[m.end():]
    if len(payload) * 3 // 4 > max_bytes + 3:
        raise ImageTooLarge(f"The image is larger than the {max_bytes}-byte limit.")
    try:
        data = pybase64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageError("The data: URL is not valid base64.") from exc
    if len(data) > max_bytes:
        raise ImageTooLarge(f"The image is larger than the {max_bytes}-byte limit.")
    return data


class Source(Protocol):
    """One way of getting bytes (a URL scheme)."""

    async def get(self, url: str) -> bytes: ...


class HttpSource:
    """http(s):// with byte caps enforced while streaming and a whole-fetch deadline."""

    def __init__(self, settings: FetchSettings) -> None:
        import httpx

        self._s = settings
        self._httpx = httpx
        self._client = httpx.AsyncClient(
            follow_redirects=True,
            max_redirects=5,
            timeout=httpx.Timeout(
                connect=settings.connect_timeout_s,
                read=settings.read_timeout_s,
                write=settings.read_timeout_s,
                pool=settings.connect_timeout_s,
            ),
            headers={"User-Agent": "iris-image-fetcher/0.1"},
        )

    async def get(self, url: str) -> bytes:
        httpx = self._httpx
        cap = self._s.max_image_bytes
        try:
            async with self._client.stream("GET", url) as resp:
                if resp.status_code == 404 or resp.status_code == 410:
                    raise ImageNotFound(f"The image URL returned HTTP {resp.status_code}.")
                if resp.status_code >= 500 or resp.status_code == 429:
                    raise UpstreamUnavailable(
                        f"The image server returned HTTP {resp.status_code}."
                    )
                if resp.status_code >= 400:
                    raise ImageError(f"The image URL returned HTTP {resp.status_code}.")
                declared = resp.headers.get("content-length")
                if declared and declared.isdigit() and int(declared) > cap:
                    raise ImageTooLarge(f"The image is larger than the {cap}-byte limit.")
                chunks: list[bytes] = []
                size = 0
                async for chunk in resp.aiter_bytes():
                    size += len(chunk)
                    if size > cap:
                        raise ImageTooLarge(f"The image is larger than the {cap}-byte limit.")
                    chunks.append(chunk)
                return b"".join(chunks)
        except httpx.TimeoutException as exc:
            raise FetchTimeout("Fetching the image timed out.") from exc
        except httpx.TooManyRedirects as exc:
            raise ImageError("The image URL redirected too many times.") from exc
        except httpx.HTTPError as exc:
            raise ImageError("The image URL could not be fetched.") from exc


class S3Source:
    """s3://bucket/key[?versionId=...] through boto3's standard credential chain."""

    def __init__(self, settings: FetchSettings, client_factory: Callable[[], Any] | None = None):
        self._s = settings
        self._factory = client_factory or _default_s3_client
        self._client: Any = None

    def _get_sync(self, bucket: str, key: str, version: str | None) -> bytes:
        from botocore.exceptions import BotoCoreError, ClientError

        if self._client is None:
            self._client = self._factory()
        cap = self._s.max_image_bytes
        extra = {"VersionId": version} if version else {}
        try:
            head = self._client.head_object(Bucket=bucket, Key=key, **extra)
            if int(head.get("ContentLength", 0)) > cap:
                raise ImageTooLarge(f"The image is larger than the {cap}-byte limit.")
            obj = self._client.get_object(Bucket=bucket, Key=key, **extra)
            body = obj["Body"]
            data = body.read(cap + 1)
            body.close()
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in ("NoSuchKey", "404", "NotFound", "NoSuchVersion"):
                raise ImageNotFound(f"s3://{bucket}/{key} does not exist.") from exc
            if code in ("NoSuchBucket",):
                raise ImageNotFound(f"The S3 bucket {bucket!r} does not exist.") from exc
            if code in ("AccessDenied", "403", "Forbidden", "AllAccessDisabled"):
                raise FetchForbidden(f"Access to s3://{bucket}/{key} was denied.") from exc
            raise UpstreamUnavailable("S3 could not return the image.") from exc
        except BotoCoreError as exc:
            raise UpstreamUnavailable("S3 could not be reached.") from exc
        if len(data) > cap:
            raise ImageTooLarge(f"The image is larger than the {cap}-byte limit.")
        return data

    async def get(self, url: str) -> bytes:
        bucket, key, version = parse_s3_url(url)
        allowed = self._s.s3_allowed_buckets
        if "*" not in allowed and bucket not in allowed:
            raise FetchForbidden(
                f"S3 bucket {bucket!r} is not allowed; add it to fetch.s3_allowed_buckets "
                "(IRIS_FETCH__S3_ALLOWED_BUCKETS)."
            )
        return await asyncio.to_thread(self._get_sync, bucket, key, version)


def _default_s3_client() -> Any:
    import boto3
    from botocore.config import Config

    # boto3 reads region, credentials and AWS_ENDPOINT_URL from the standard chain.
    return boto3.client("s3", config=Config(retries={"max_attempts": 3, "mode": "adaptive"}))


def parse_s3_url(url: str) -> tuple[str, str, str | None]:
    parts = urllib.parse.urlsplit(url)
    bucket = parts.netloc
    key = urllib.parse.unquote(parts.path.lstrip("/"))
    if not bucket or not key:
        raise ImageError("An s3:// image URL must be s3://bucket/key.")
    version = urllib.parse.parse_qs(parts.query).get("versionId", [None])[0]
    return bucket, key, version


class Fetcher:
    """Scheme dispatch plus a whole-fetch deadline."""

    def __init__(self, settings: FetchSettings, sources: dict[str, Source] | None = None):
        self._s = settings
        self._sources: dict[str, Source] = sources if sources is not None else {
            "http": HttpSource(settings),
            "s3": S3Source(settings),
        }
        self._sources.setdefault("https", self._sources.get("http"))  # type: ignore[arg-type]

    async def fetch(self, url: str) -> FetchedImage:
        if not isinstance(url, str) or not url:
            raise ImageError("The image URL is empty.")
        scheme = url.split(":", 1)[0].lower() if ":" in url else ""
        if scheme == "data":
            return finish(decode_data_uri(url, self._s.max_image_bytes))
        source = self._sources.get(scheme)
        if source is None:
            raise FetchForbidden(
                f"Image URLs with scheme {scheme!r} are not allowed; use https://, http://, "
                "s3:// or data:."
            )
        data = await _with_deadline(source.get(url), self._s.total_timeout_s)
        return finish(data)


async def _with_deadline(aw: Awaitable[bytes], seconds: float) -> bytes:
    try:
        return await asyncio.wait_for(aw, timeout=seconds)
    except TimeoutError as exc:
        raise FetchTimeout(f"Fetching the image took longer than {seconds:g} s.") from exc
