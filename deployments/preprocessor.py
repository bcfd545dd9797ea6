"""ImagePreprocessor: bytes -> uint8 pixels at the model's target size (CPU bound)."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import ray
from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments.contract import ImageMeta
from deployments.logs import quiet_client_errors
from deployments.metrics import metrics
from deployments.retry import retrying
from handlers.cache import SingleFlight, SizedLRU
from handlers.config import IrisConfig
from handlers.imaging import (
    PreparedPixels,
    configure_threads,
    geometry_from,
    pixel_bounds,
    prepare_image,
    warm_up,
)
from handlers.media import FetchedImage, decode_data_uri, finish
from handlers.protocol import Detail


def _assigned_cpus() -> int:
    try:
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    except Exception:
        cpus = 1.0
    return max(1, round(cpus))


@serve.deployment(name="ImagePreprocessor")
class ImagePreprocessor:
    def __init__(self, config: IrisConfig, fetcher: DeploymentHandle) -> None:
        quiet_client_errors()
        self._cfg = config.imaging
        self._fetcher = fetcher
        self._fetch_budget_s = config.fetch.total_timeout_s
        if config.model.processor is None:
            raise ValueError("model.processor is not set: build_app fills it in")
        geometry = geometry_from(config.model.processor)
        self._geometry = dataclasses.replace(
            geometry,
            min_pixels=self._cfg.min_pixels or geometry.min_pixels,
            max_pixels=self._cfg.max_pixels or geometry.max_pixels,
        )
        # Decoding and resizing release the GIL: one worker thread per CPU this replica owns.
        threads = _assigned_cpus()
        # One torch thread per worker: parallelism comes from the workers, not inside a resize.
        configure_threads(1)
        self._pool = ThreadPoolExecutor(
            max_workers=threads, thread_name_prefix="iris-prep",
            initializer=configure_threads, initargs=(1,),
        )
        # Serve reports the replica ready only after this: no user request pays for it.
        self._pool.submit(warm_up, self._geometry, self._cfg.fidelity).result()
        self._max_image_bytes = config.fetch.max_image_bytes
        # Resized pixels of recent images, in this process's memory, by content and size.
        self._cache: SizedLRU[tuple[ImageMeta, np.ndarray]] = SizedLRU(
            self._cfg.cache_max_bytes
        )
        self._flight = SingleFlight()

    async def prepare(
        self, url: str, detail: Detail = "auto", budget_s: float | None = None
    ) -> AsyncIterator[ImageMeta | np.ndarray]:
        """Streams the image's ImageMeta, then its pixels (HxWx3 uint8). As items of the
        caller's streaming call, both belong to the caller, not to this replica."""
        deadline = time.monotonic() + (self._fetch_budget_s if budget_s is None else budget_s)
        fetched = await self._fetch(url, deadline)
        min_px, max_px = pixel_bounds(
            self._geometry, detail, self._cfg.default_detail, self._cfg.low_detail_max_pixels
        )
        key = (fetched.sha256, min_px, max_px, self._cfg.fidelity, self._cfg.fast_min_headroom)
        cached = self._cache.get(key)
        if cached is None:
            # Concurrent requests for one image share a single decode.
            cached = await self._flight.run(
                key, lambda: self._prepare(fetched, key, min_px, max_px))
        meta, pixels = cached
        yield meta
        yield pixels

    async def _fetch(self, url: str, deadline: float) -> FetchedImage:
        if url[:5].lower() != "data:":
            fetched: FetchedImage = await retrying(
                "fetch", lambda: self._fetcher.fetch.remote(url), deadline)
            return fetched
        # data: URIs carry their bytes: decoding here (same rules, handlers.media) saves
        # shipping megabytes to the fetcher and back.
        t0 = time.perf_counter()
        fetched = await asyncio.to_thread(
            lambda: finish(decode_data_uri(url, self._max_image_bytes), inline=True)
        )
        metrics().fetched("data", time.perf_counter() - t0, len(fetched.data))
        return fetched

    async def _prepare(
        self, fetched: FetchedImage, key: tuple[object, ...], min_px: int, max_px: int
    ) -> tuple[ImageMeta, np.ndarray]:
        t0 = time.perf_counter()
        pixels: PreparedPixels = await asyncio.get_running_loop().run_in_executor(
            self._pool,
            lambda: prepare_image(
                fetched.data,
                self._geometry,
                min_pixels=min_px,
                max_pixels=max_px,
                fidelity=self._cfg.fidelity,
                fast_headroom=self._cfg.fast_min_headroom,
                max_decoded_pixels=self._cfg.max_decoded_pixels,
            ),
        )
        m = metrics()
        m.stage("preprocess", time.perf_counter() - t0)
        m.pixels.inc(pixels.source_width * pixels.source_height, tags={"direction": "in"})
        m.pixels.inc(pixels.width * pixels.height, tags={"direction": "out"})
        # The uuid names the exact pixels: same bytes at another size are another item.
        meta = ImageMeta(uuid=f"{fetched.sha256[:32]}-{pixels.width}x{pixels.height}",
                         width=pixels.width, height=pixels.height)
        self._cache.put(key, (meta, pixels.array), pixels.array.nbytes)
        return meta, pixels.array

    async def stats(self) -> dict[str, int]:
        return self._cache.stats()
