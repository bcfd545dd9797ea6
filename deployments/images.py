"""The ingress's side of image preparation: every image of a request prepared by the
ImagePreprocessor deployment, with the pixels owned by this process.

- Ownership: `prepare` returns the image's ImageMeta and its pixels. The return value of a
  call belongs to the caller (Ray's ownership rules), so the pixels live as long as this
  process holds them, whatever becomes of the preprocessor replica that computed them (a
  crash, a scale-down). One unary call, not a stream of metadata then pixels: the pixels
  came back inline anyway (objects up to 4 MiB do), and one item per image costs the
  ingress and the preprocessor less CPU (compare-25).
- Retries: the call is idempotent, so it is retried when its replica dies (deployments.retry).
- data: URIs in this process (deployments.data_uris_in_ingress): their bytes are here
  already, so preparing them here saves a Ray call and a process per image.
- Recent data: URIs: the prepared images of recent data: URIs, by the URI's hash. A chat app
  re-sends its conversation's images every turn; a repeat skips the preprocessor round trip.
"""

from __future__ import annotations

import asyncio
import time
from typing import Literal

from blake3 import blake3  # a third of SHA-256's time on a 9 MB URI, still collision-safe
from ray.serve.handle import DeploymentHandle

from deployments.contract import ImageMeta, PreparedImage
from deployments.preprocessor import Preparation
from deployments.ray_errors import client_error
from deployments.retry import retrying
from handlers.cache import SizedLRU
from handlers.config import IrisConfig
from handlers.errors import InvalidRequest, UpstreamUnavailable
from handlers.protocol import ImageRef

# Hashing megabytes on the event loop would stall every other request.
HASH_IN_THREAD_OVER = 1 << 20


# Which model's resize rule an image is prepared for.
Target = Literal["chat", "encoder"]


async def data_uri_key(url: str, detail: str, target: Target = "chat") -> tuple[str, str, str]:
    """A data: URI is its own content: its hash names the prepared pixels for good."""
    if len(url) > HASH_IN_THREAD_OVER:
        digest = await asyncio.to_thread(lambda: blake3(url.encode()).hexdigest())
    else:
        digest = blake3(url.encode()).hexdigest()
    return digest, detail, target


class ImagePreparer:
    def __init__(self, preprocessor: DeploymentHandle, config: IrisConfig) -> None:
        self._prep = preprocessor
        self._limits = config.limits
        self._recent: SizedLRU[PreparedImage] = SizedLRU(config.imaging.cache_max_bytes)
        # data: URIs prepared here (deployments.data_uris_in_ingress); no second cache of
        # their pixels, as _recent holds them.
        self._local = (Preparation(config.for_cpu_tier(), None, cache_max_bytes=0)
                       if config.deployments.data_uris_in_ingress else None)

    async def prepare_all(
        self, refs: list[ImageRef], deadline: float, *, target: Target = "chat",
    ) -> list[PreparedImage]:
        """Every image of a request, in order; the total pixel count checked."""
        images = list(await asyncio.gather(*(self.prepare(r, deadline, target=target)
                                             for r in refs)))
        total = sum(img.pixel_count for img in images)
        if total > self._limits.max_total_pixels:
            raise InvalidRequest(
                f"The request's images total {total} pixels after resizing; the limit is "
                f"{self._limits.max_total_pixels}.", param="messages", code="too_many_pixels",
            )
        return images

    async def prepare(self, ref: ImageRef, deadline: float, *, target: Target = "chat"
                      ) -> PreparedImage:
        key = None
        if ref.url[:5].lower() == "data:":
            key = await data_uri_key(ref.url, ref.detail, target)
            hit = self._recent.get(key)
            if hit is not None:
                return hit
        try:
            prepared = await retrying("preprocess", lambda: self._call(ref, deadline, target),
                                      deadline)
        except Exception as exc:
            err = client_error(exc)
            # The image's own errors name it: the client's (4xx) and its source's (502).
            if (err.status < 500 or isinstance(err, UpstreamUnavailable)) and not err.param:
                err.with_param(ref.param + ".url")
            raise err from None
        if key is not None:
            self._recent.put(key, prepared, prepared.pixel_count * 3)
        return prepared

    async def _call(self, ref: ImageRef, deadline: float, target: Target) -> PreparedImage:
        budget = max(0.0, deadline - time.monotonic())
        meta: ImageMeta
        if self._local is not None and ref.url[:5].lower() == "data:":
            meta, pixels = await self._local.prepare(ref.url, ref.detail, budget, target)
        else:
            meta, pixels = await self._prep.prepare.remote(ref.url, ref.detail, budget, target)
        return PreparedImage(meta, pixels)

    def stats(self) -> dict[str, int]:
        return self._recent.stats()
