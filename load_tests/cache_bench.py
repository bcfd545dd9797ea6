"""The fetcher cache on a repeated-image workload against S3 with added latency.

A real S3 protocol server (moto, on loopback) behind a client that adds a fixed latency to
every S3 call, as a remote region would. The same workload (many requests drawn from a few
distinct images, several in flight at once) runs with the cache off and on.

    .venv/bin/python -m load_tests.cache_bench [--requests 200] [--distinct 10]
        [--concurrency 8] [--latency-ms 40]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from collections import Counter
from typing import Any

from handlers.config import FetchSettings
from handlers.fetch import Fetcher, S3Source
from tests.images import encode, pattern
from tests.servers import S3Server


class SlowCountingClient:
    """A real boto3 S3 client, slowed by `latency_s` per call, counting calls."""

    def __init__(self, client: Any, latency_s: float) -> None:
        self._client = client
        self._latency = latency_s
        self.calls: Counter[str] = Counter()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if not callable(attr) or name.startswith("_"):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls[name] += 1
            time.sleep(self._latency)  # runs in the fetcher's worker thread, like real I/O
            return attr(*args, **kwargs)

        return call


async def run(s3: S3Server, urls: list[str], args: argparse.Namespace, cache_bytes: int
              ) -> dict[str, Any]:
    settings = FetchSettings(s3_allowed_buckets=["*"], cache_max_bytes=cache_bytes)
    client = SlowCountingClient(s3.client(), args.latency_ms / 1000)
    fetcher = Fetcher(settings, sources={"s3": S3Source(settings, lambda: client)})
    rng = random.Random(0)
    order = [rng.choice(urls) for _ in range(args.requests)]
    sem = asyncio.Semaphore(args.concurrency)
    latencies: list[float] = []

    async def one(url: str) -> None:
        async with sem:
            t0 = time.perf_counter()
            await fetcher.fetch(url)
            latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*(one(u) for u in order))
    wall = time.perf_counter() - t0
    await fetcher.aclose()
    latencies.sort()
    return {
        "cache": "on" if cache_bytes else "off",
        "fetches_per_s": args.requests / wall,
        "p50_ms": latencies[len(latencies) // 2] * 1000,
        "p99_ms": latencies[int(len(latencies) * 0.99) - 1] * 1000,
        "get_object": client.calls["get_object"],
        "head_object": client.calls["head_object"],
        "stats": fetcher.stats(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--distinct", type=int, default=10)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--latency-ms", type=float, default=40.0)
    args = p.parse_args()

    s3 = S3Server()
    try:
        print(f">> uploading {args.distinct} JPEGs (1024x768) to moto S3", flush=True)
        urls = [s3.put("bench-images", f"img-{i}.jpg", encode(pattern(1024, 768, seed=i), "JPEG"))
                for i in range(args.distinct)]
        print(f">> {args.requests} fetches over {args.distinct} distinct images, concurrency "
              f"{args.concurrency}, +{args.latency_ms:g} ms per S3 call", flush=True)
        print("| cache | fetches/s | p50 ms | p99 ms | GetObject | HeadObject | hits | misses |")
        print("|---|---|---|---|---|---|---|---|")
        for cache_bytes in (0, 256 << 20):
            r = asyncio.run(run(s3, urls, args, cache_bytes))
            st = r["stats"]
            print(f"| {r['cache']} | {r['fetches_per_s']:.1f} | {r['p50_ms']:.1f} | "
                  f"{r['p99_ms']:.1f} | {r['get_object']} | {r['head_object']} | "
                  f"{st.get('hits', 0)} | {st.get('misses', 0)} |", flush=True)
    finally:
        s3.close()


if __name__ == "__main__":
    main()
