"""ImagePreprocessor: bytes -> uint8 pixels at the model's target size (CPU bound)."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import ray
from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments.metrics import metrics
from handlers.cache import SingleFlight, SizedLRU
from handlers.config import IrisConfig
from handlers.imaging import (
    Detail,
    configure_threads,
    load_geometry,
    pixel_bounds,
    prepare_image,
    warm_up,
)
from handlers.media import FetchedImage, decode_data_uri, finish


@dataclass(frozen=True)
class PreparedImage:
    """What the ingress gets back: a reference to the pixels, never the pixels."""

    ref: ray.ObjectRef
    uuid: str
    width: int
    height: int
    tokens: int


def _assigned_cpus() -> int:
    try:
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    except Exception:
        cpus = 1.0
    return max(1, round(cpus))


@serve.deployment(name="ImagePreprocessor")
class ImagePreprocessor:
    def __init__(self, config: IrisConfig, fetcher: DeploymentHandle) -> None:
        self._cfg = config.imaging
        self._fetcher = fetcher
        geometry = load_geometry(config.model.source)
        if self._cfg.min_pixels or self._cfg.max_pixels:
            geometry = type(geometry)(
                patch_size=geometry.patch_size,
                merge_size=geometry.merge_size,
                min_pixels=self._cfg.min_pixels or geometry.min_pixels,
                max_pixels=self._cfg.max_pixels or geometry.max_pixels,
            )
        self._geometry = geometry
        # Decoding and resizing release the GIL: one worker thread per CPU this replica owns.
        threads = _assigned_cpus()
        # One torch thread per worker: parallelism comes from the workers, not inside a resize.
        configure_threads(1)
        self._pool = ThreadPoolExecutor(
            max_workers=threads, thread_name_prefix="iris-prep",
            initializer=configure_threads, initargs=(1,),
        )
        # Serve reports the replica ready only after this: no user request pays for it.
        self._pool.submit(warm_up, geometry, self._cfg.fidelity).result()
        self._max_image_bytes = config.fetch.max_image_bytes
        self._cache: SizedLRU[PreparedImage] = SizedLRU(self._cfg.cache_max_bytes)
        self._flight = SingleFlight()

    async def prepare(self, url: str, detail: Detail = "auto") -> PreparedImage:
        fetched = await self._fetch(url)
        min_px, max_px = pixel_bounds(
            self._geometry, detail, self._cfg.default_detail, self._cfg.low_detail_max_pixels
        )
        key = (fetched.sha256, min_px, max_px, self._cfg.fidelity, self._cfg.fast_min_headroom)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        # Concurrent requests for one image share a single decode.
        return await self._flight.run(key, lambda: self._prepare(fetched, key, min_px, max_px))

    async def _fetch(self, url: str) -> FetchedImage:
        if url[:5].lower() != "data:":
            return await self._fetcher.fetch.remote(url)
        # data: URIs carry their bytes: decoding here (same rules, handlers.media) saves
        # shipping megabytes to the fetcher and back.
        t0 = time.perf_counter()
        fetched = await asyncio.to_thread(
            lambda: finish(decode_data_uri(url, self._max_image_bytes))
        )
        metrics().fetched("data", time.perf_counter() - t0, len(fetched.data))
        return fetched

    async def _prepare(
        self, fetched: FetchedImage, key: tuple[object, ...], min_px: int, max_px: int
    ) -> PreparedImage:
        t0 = time.perf_counter()
        pixels = await asyncio.get_running_loop().run_in_executor(
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
        uuid = f"{fetched.sha256[:32]}-{pixels.width}x{pixels.height}"
        prepared = PreparedImage(
            ref=ray.put(pixels.array),
            uuid=uuid,
            width=pixels.width,
            height=pixels.height,
            tokens=self._geometry.tokens_for(pixels.height, pixels.width),
        )
        # Cached entries keep their object-store pixels alive: a repeat is free.
        self._cache.put(key, prepared, pixels.array.nbytes)
        return prepared

    async def stats(self) -> dict[str, int]:
        return self._cache.stats()
