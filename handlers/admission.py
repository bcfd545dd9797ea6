"""Admission to an in-process engine: what Ray Serve's max_ongoing_requests and
max_queued_requests do for the LLMServer deployment, for the engine inside ChatIngress
(deployments.engine_in_ingress), so overload is refused the same way in both layouts."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from handlers.errors import Overloaded


class Admission:
    """At most `running` requests at once, `waiting` more queued (None or -1: no cap);
    beyond that, Overloaded (503, Retry-After) at once."""

    def __init__(self, running: int, waiting: int | None = None) -> None:
        if running < 1:
            raise ValueError("running must be at least 1")
        self._slots = asyncio.Semaphore(running)
        self._max_waiting = None if waiting is None or waiting < 0 else waiting
        self.waiting = 0

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        if self._slots.locked():
            if self._max_waiting is not None and self.waiting >= self._max_waiting:
                raise Overloaded.at_capacity()
            self.waiting += 1
            try:
                await self._slots.acquire()
            finally:
                self.waiting -= 1
        else:
            await self._slots.acquire()
        try:
            yield
        finally:
            self._slots.release()
