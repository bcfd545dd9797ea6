"""ImagePreprocessor: bytes -> uint8 pixels at the model's target size (CPU bound)."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import ray
from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments.contract import ImageMeta
from deployments.logs import behind_the_ingress
from deployments.metrics import metrics
from deployments.retry import retrying
from handlers.cache import SingleFlight, SizedLRU
from handlers.config import IrisConfig
from handlers.cpu_affinity import to_replica_cores
from handlers.imaging import (
    PreparedPixels,
    configure_threads,
    keep_pixel_blocks,
    prepare_image,
    warm_up,
)
from handlers.media import FetchedImage, decode_data_uri, finish
from handlers.protocol import Detail
from handlers.resize_rules import ResizeRule, rule_from


def _assigned_cpus() -> int:
    try:
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    except Exception:
        cpus = 1.0
    return max(1, round(cpus))


class Preparation:
    """Bytes to pixels for each served model, with a cache of recent results: the
    ImagePreprocessor deployment's work, and (deployments.data_uris_in_ingress) the
    ingress's own for data: URIs. `fetcher` is None where only data: URIs come."""

    def __init__(self, config: IrisConfig, fetcher: DeploymentHandle | None,
                 cache_max_bytes: int | None = None) -> None:
        self._cfg = config.imaging
        self._fetcher = fetcher
        self._fetch_budget_s = config.fetch.total_timeout_s
        # Each model's own resize rule, learnt from its processor config (build_app fills them
        # in): Qwen2-VL's smart_resize for chat, CLIP's resize-and-crop for the encoder, ...
        self._rules: dict[str, ResizeRule] = {}
        if config.serve_chat:
            if config.model.processor is None:
                raise ValueError("model.processor is not set: build_app fills it in")
            self._rules["chat"] = rule_from(
                config.model.processor, default_detail=self._cfg.default_detail,
                low_max_pixels=self._cfg.low_detail_max_pixels,
                min_pixels=self._cfg.min_pixels, max_pixels=self._cfg.max_pixels)
        if config.encoder is not None:
            if config.encoder.processor is None:
                raise ValueError("encoder.processor is not set: build_app fills it in")
            self._rules["encoder"] = rule_from(config.encoder.processor)
        # Decoding and resizing release the GIL: one worker thread per CPU this replica owns.
        threads = _assigned_cpus()
        # One torch thread per worker: parallelism comes from the workers, not inside a resize.
        configure_threads(1)
        keep_pixel_blocks(threads)
        self._pool = ThreadPoolExecutor(
            max_workers=threads, thread_name_prefix="iris-prep",
            initializer=configure_threads, initargs=(1,),
        )
        # Serve reports the replica ready only after this: no user request pays for it.
        for rule in self._rules.values():
            self._pool.submit(warm_up, rule, self._cfg.fidelity).result()
        self._max_image_bytes = config.fetch.max_image_bytes
        # Resized pixels of recent images, in this process's memory, by content and size.
        self._cache: SizedLRU[tuple[ImageMeta, np.ndarray]] = SizedLRU(
            self._cfg.cache_max_bytes if cache_max_bytes is None else cache_max_bytes
        )
        self._flight = SingleFlight()

    async def prepare(
        self, url: str, detail: Detail = "auto", budget_s: float | None = None,
        target: str = "chat",
    ) -> tuple[ImageMeta, np.ndarray]:
        """The image's ImageMeta and its pixels (HxWx3 uint8) as `target`'s model ("chat"
        or "encoder") wants them. The return value of the caller's call belongs to the
        caller, not to this replica."""
        deadline = time.monotonic() + (self._fetch_budget_s if budget_s is None else budget_s)
        rule = self._rules.get(target)
        if rule is None:
            raise ValueError(f"no model here takes images for {target!r}")
        fetched = await self._fetch(url, deadline)
        key = (fetched.sha256, target, rule.cache_key(detail), self._cfg.fidelity,
               self._cfg.fast_min_headroom)
        cached = self._cache.get(key)
        if cached is None:
            # Concurrent requests for one image share a single decode.
            cached = await self._flight.run(
                key, lambda: self._prepare(fetched, key, rule, detail, target))
        return cached

    async def _fetch(self, url: str, deadline: float) -> FetchedImage:
        if url[:5].lower() != "data:":
            if self._fetcher is None:
                raise ValueError("only data: URIs are prepared here")
            fetcher = self._fetcher
            fetched: FetchedImage = await retrying(
                "fetch", lambda: fetcher.fetch.remote(url), deadline)
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
        self, fetched: FetchedImage, key: tuple[object, ...], rule: ResizeRule, detail: Detail,
        target: str,
    ) -> tuple[ImageMeta, np.ndarray]:
        t0 = time.perf_counter()
        pixels: PreparedPixels = await asyncio.get_running_loop().run_in_executor(
            self._pool,
            lambda: prepare_image(
                fetched.data,
                rule,
                detail=detail,
                fidelity=self._cfg.fidelity,
                fast_headroom=self._cfg.fast_min_headroom,
                max_decoded_pixels=self._cfg.max_decoded_pixels,
            ),
        )
        m = metrics()
        m.stage("preprocess", time.perf_counter() - t0)
        m.pixels.inc(pixels.source_width * pixels.source_height, tags={"direction": "in"})
        m.pixels.inc(pixels.width * pixels.height, tags={"direction": "out"})
        # The uuid names the exact pixels: same bytes at another size (or cropped for another
        # model) are another item; each engine caches by it.
        tag = "" if target == "chat" else f"-{target}"
        meta = ImageMeta(uuid=f"{fetched.sha256[:32]}{tag}-{pixels.width}x{pixels.height}",
                         width=pixels.width, height=pixels.height)
        self._cache.put(key, (meta, pixels.array), pixels.array.nbytes)
        return meta, pixels.array

    def cache_stats(self) -> dict[str, int]:
        return self._cache.stats()


@serve.deployment(name="ImagePreprocessor")
class ImagePreprocessor(Preparation):
    def __init__(self, config: IrisConfig, fetcher: DeploymentHandle) -> None:
        to_replica_cores()
        behind_the_ingress()
        super().__init__(config, fetcher)

    async def stats(self) -> dict[str, int]:
        return self.cache_stats()
