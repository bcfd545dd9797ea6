"""ImageFetcher: URL -> bytes + media type + content hash (I/O bound, many per core)."""

from __future__ import annotations

from ray import serve

from handlers.config import IrisConfig
from handlers.fetch import FetchedImage, Fetcher


@serve.deployment(name="ImageFetcher")
class ImageFetcher:
    def __init__(self, config: IrisConfig) -> None:
        # One Fetcher per replica: its cache and single-flight serve every request here.
        self._fetcher = Fetcher(config.fetch)

    async def fetch(self, url: str) -> FetchedImage:
        return await self._fetcher.fetch(url)

    async def stats(self) -> dict[str, int]:
        """Cache hits/misses/bytes/entries and single-flight counters."""
        return self._fetcher.stats()
