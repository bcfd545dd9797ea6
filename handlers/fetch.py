"""URL -> image bytes, media type and content hash. Owns where bytes may come from.

Caching (see handlers/cache.py), per scheme:
- s3://: keyed by (bucket, key, versionId) and validated by a HEAD's ETag on every fetch;
  a HEAD is cheap, the GET is what a hit saves.
- http(s)://: keyed by URL for a short TTL (HTTP_CACHE_TTL_S, lowered by max-age and
  skipped for no-store/no-cache/private), since chat clients resend the same image URL on
  every turn. Servers give no validator as cheap as S3's HEAD, so no revalidation.
- data: never cached; the bytes came with the request.
All schemes go through single-flight: concurrent fetches of one URL share one download.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

import httpcore
import httpx

from handlers.cache import ImageCache, SingleFlight, http_cache_ttl
from handlers.config import FetchSettings
from handlers.errors import FetchForbidden, FetchTimeout, ImageError, ImageUnreachable
from handlers.formats import sniff_media_type
from handlers.media import (
    Cache,
    FetchedImage,
    Source,
    decode_data_uri,
    finish,
)
from handlers.netguard import Resolver, check_url, guarded_transport, next_hop, read_body
from handlers.s3_source import S3Source, parse_s3_url

__all__ = [
    "FetchedImage",
    "Fetcher",
    "HttpSource",
    "S3Source",
    "decode_data_uri",
    "parse_s3_url",
    "sniff_media_type",
]

MAX_REDIRECTS = 5
HTTP_CACHE_TTL_S = 60.0


class HttpSource:
    """http(s):// through the SSRF guard, redirects followed (and re-checked) by hand."""

    def __init__(
        self,
        settings: FetchSettings,
        resolver: Resolver | None = None,
        *,
        ssl_context: ssl.SSLContext | None = None,
        network_backend: httpcore.AsyncNetworkBackend | None = None,
    ) -> None:
        self._s = settings
        self._client = httpx.AsyncClient(
            transport=guarded_transport(
                settings, resolver, ssl_context=ssl_context, network_backend=network_backend
            ),
            follow_redirects=False,
            trust_env=False,  # a proxy from the environment would bypass the address guard
            timeout=httpx.Timeout(
                connect=settings.connect_timeout_s,
                read=settings.read_timeout_s,
                write=settings.read_timeout_s,
                pool=settings.connect_timeout_s,
            ),
            # identity: the byte cap counts wire bytes and no decompression bomb can grow.
            headers={"User-Agent": "iris-image-fetcher/0.1", "Accept": "image/*",
                     "Accept-Encoding": "identity"},
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def get(self, url: str, cache: Cache) -> FetchedImage:
        target = check_url(url, self._s)
        key = ("url", str(target))
        hit = cache.get(key)
        if hit is not None:
            return hit
        data, ttl = await self._download(target)
        image = finish(data)
        cache.put(key, image, ttl_s=ttl)
        return image

    async def _download(self, url: httpx.URL) -> tuple[bytes, float]:
        try:
            for _ in range(MAX_REDIRECTS + 1):
                async with self._client.stream("GET", url) as resp:
                    if resp.is_redirect:
                        url = next_hop(url, resp.headers.get("location", ""), self._s)
                        continue
                    return await read_body(resp, self._s.max_image_bytes), http_cache_ttl(
                        resp.headers.get("cache-control", ""), HTTP_CACHE_TTL_S)
        except httpx.ConnectTimeout as exc:
            raise FetchTimeout("Connecting to the image server timed out.") from exc
        except httpx.TimeoutException as exc:
            raise FetchTimeout(
                f"The image server sent nothing for {self._s.read_timeout_s:g} s."
            ) from exc
        except httpx.ConnectError as exc:
            raise ImageUnreachable("Could not connect to the image server.") from exc
        except httpx.RemoteProtocolError as exc:
            raise ImageError("The image server broke off or sent a malformed response.") from exc
        except httpx.HTTPError as exc:
            raise ImageError("The image URL could not be fetched.") from exc
        raise ImageError(f"The image URL redirected more than {MAX_REDIRECTS} times.")


class Fetcher:
    """Scheme dispatch, a whole-fetch deadline, the shared cache and single-flight."""

    def __init__(self, settings: FetchSettings, sources: dict[str, Source] | None = None):
        self._s = settings
        self._cache: Cache = ImageCache(settings.cache_max_bytes)
        self._flight = SingleFlight()
        self._sources: dict[str, Source] = sources if sources is not None else {
            "http": HttpSource(settings),
            "s3": S3Source(settings),
        }
        if "http" in self._sources:
            self._sources.setdefault("https", self._sources["http"])

    async def fetch(self, url: str) -> FetchedImage:
        if not isinstance(url, str) or not url:
            raise ImageError("The image URL is empty.")
        scheme = url.split(":", 1)[0].lower() if ":" in url else ""
        if scheme == "data":
            return finish(decode_data_uri(url, self._s.max_image_bytes), inline=True)
        source = self._sources.get(scheme)
        if source is None:
            raise FetchForbidden(
                f"Image URLs with scheme {scheme!r} are not allowed; use https://, http://, "
                "s3:// or data:."
            )
        return await self._flight.run(url, lambda: self._deadline(source.get(url, self._cache)))

    async def _deadline(self, work: Any) -> FetchedImage:
        seconds = self._s.total_timeout_s
        try:
            image: FetchedImage = await asyncio.wait_for(work, timeout=seconds)
            return image
        except TimeoutError as exc:
            raise FetchTimeout(f"Fetching the image took longer than {seconds:g} s.") from exc

    def stats(self) -> dict[str, int]:
        return {**self._cache.stats(), "in_flight": len(self._flight),
                "coalesced": self._flight.coalesced}

    async def aclose(self) -> None:
        for source in {id(s): s for s in self._sources.values()}.values():
            close = getattr(source, "aclose", None)
            if close is not None:
                await close()

    async def __aenter__(self) -> Fetcher:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

