"""Calls to idempotent stages (fetch, preprocess, embed, and a chat before its first event)
are retried when the replica serving them died or became unreachable, as Serve does not
retry a request a replica already accepted. Bounded by the request's deadline; every retry
is counted and logged."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from deployments.metrics import metrics
from deployments.ray_errors import replica_gone, unwrap

logger = logging.getLogger("ray.serve.iris.retry")

T = TypeVar("T")

# Serve replaces a dead replica in seconds; other replicas take over at once.
BACKOFF_S = (0.05, 0.25, 0.5, 1.0, 2.0)


async def retrying(
    stage: str,
    call: Callable[[], Awaitable[T]],
    deadline: float,
    *,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> T:
    """`call()`, again (after a short backoff) each time its replica is gone, until it
    answers, fails otherwise, or the next try would start past `deadline` (on `clock`)."""
    attempt = 0
    while True:
        try:
            return await call()
        except Exception as exc:
            attempt += 1
            if not await before_retry(stage, exc, attempt, deadline, clock=clock, sleep=sleep):
                raise


async def before_retry(
    stage: str,
    exc: BaseException,
    attempt: int,
    deadline: float,
    *,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> bool:
    """After failed try number `attempt`: False if the call must not be tried again (its
    replica is not gone, or the next try would start past `deadline`); else the retry is
    counted and logged, and True once its backoff has passed."""
    delay = BACKOFF_S[min(attempt - 1, len(BACKOFF_S) - 1)]
    if not replica_gone(exc) or clock() + delay >= deadline:
        return False
    metrics().retries.inc(tags={"stage": stage})
    logger.warning("%s: the replica serving it is gone (%s); retry %d",
                   stage, type(unwrap(exc)).__name__, attempt)
    await sleep(delay)
    return True
