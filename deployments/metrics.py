"""Prometheus metrics through Ray's metrics system (exported by every node's metrics agent;
Serve adds deployment/replica/application tags). Created lazily, once per replica process."""

from __future__ import annotations

import logging
from functools import cache
from typing import Any

from ray.serve import metrics as m

logger = logging.getLogger("ray.serve")

LATENCY_BOUNDARIES_S = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10,
                        30, 60, 120]
IMAGES_BOUNDARIES = [0.5, 1, 2, 3, 4, 6, 8, 12, 16]  # Ray wants positive bounds


def tags(*names: str) -> Any:
    """tag_keys for a metric (Ray annotates them as a 1-tuple; any length works)."""
    return names


class IrisMetrics:
    def __init__(self) -> None:
        self.stage_seconds = m.Histogram(
            "iris_stage_seconds",
            description="Latency per stage: fetch, preprocess, images (all of a request's), "
            "queue (images ready -> engine's first event), ttft, e2e.",
            boundaries=LATENCY_BOUNDARIES_S, tag_keys=tags("stage", "scheme", "stream"),
        )
        self.fetched_bytes = m.Counter(
            "iris_fetched_bytes_total", description="Image bytes fetched, by scheme.",
            tag_keys=tags("scheme"),
        )
        self.cache_events = m.Counter(
            "iris_fetch_cache_total", description="Fetcher cache lookups, by result.",
            tag_keys=tags("result"),
        )
        self.pixels = m.Counter(
            "iris_pixels_total", description="Pixels into (decoded) and out of (resized) the "
            "preprocessor.", tag_keys=tags("direction"),
        )
        self.errors = m.Counter(
            "iris_errors_total", description="Errors returned to clients, by type and status.",
            tag_keys=tags("type", "status"),
        )
        self.retries = m.Counter(
            "iris_retries_total", description="Calls to an idempotent stage retried because "
            "the replica serving them died or became unreachable, by stage.",
            tag_keys=tags("stage"),
        )
        self.images_per_request = m.Histogram(
            "iris_images_per_request", description="Images in each chat request.",
            boundaries=IMAGES_BOUNDARIES,
        )

    def stage(self, stage: str, seconds: float, **tags: str) -> None:
        self.stage_seconds.observe(seconds, tags={"stage": stage, "scheme": tags.get(
            "scheme", ""), "stream": tags.get("stream", "")})

    def fetched(self, scheme: str, seconds: float, nbytes: int) -> None:
        """One image obtained (fetched, or decoded from a data: URI)."""
        self.stage("fetch", seconds, scheme=scheme)
        self.fetched_bytes.inc(nbytes, tags={"scheme": scheme})


@cache
def metrics() -> IrisMetrics:
    return IrisMetrics()


def scheme_of(url: str) -> str:
    head = url[:8].lower()
    for scheme in ("data", "https", "http", "s3"):
        if head.startswith(scheme + ":"):
            return scheme
    return "other"


def record_error(err: Any) -> None:
    # Called while answering an error: a metrics fault must never turn it into another one.
    try:
        metrics().errors.inc(tags={"type": str(getattr(err, "type", "internal_error")),
                                   "status": str(getattr(err, "status", 500))})
    except Exception:
        logger.exception("could not record an error metric")
