"""ImageFetcher: URL -> bytes + media type + content hash (I/O bound, many per core)."""

from __future__ import annotations

import time

from ray import serve

from deployments.logs import behind_the_ingress
from deployments.metrics import metrics, scheme_of
from handlers.config import IrisConfig
from handlers.cpu_affinity import to_replica_cores
from handlers.fetch import FetchedImage, Fetcher


@serve.deployment(name="ImageFetcher")
class ImageFetcher:
    def __init__(self, config: IrisConfig) -> None:
        to_replica_cores()
        behind_the_ingress()
        # One Fetcher per replica: its cache and single-flight serve every request here.
        self._fetcher = Fetcher(config.fetch)
        self._seen = {"hits": 0, "misses": 0}

    async def fetch(self, url: str) -> FetchedImage:
        t0 = time.perf_counter()
        image = await self._fetcher.fetch(url)
        m = metrics()
        m.fetched(scheme_of(url), time.perf_counter() - t0, len(image.data))
        stats = self._fetcher.stats()
        for key, result in (("hits", "hit"), ("misses", "miss")):
            # The cache counts cumulatively; export the change since the last fetch.
            delta = stats.get(key, 0) - self._seen[key]
            if delta > 0:
                m.cache_events.inc(delta, tags={"result": result})
            self._seen[key] = stats.get(key, 0)
        return image

    async def stats(self) -> dict[str, int]:
        """Cache hits/misses/bytes/entries and single-flight counters."""
        return self._fetcher.stats()
