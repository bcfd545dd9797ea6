"""EngineHost: one vLLM engine in this process, kept alive, and the chat calls it answers.
Both layouts use it: the LLMServer replica, and ChatIngress's own engine
(deployments.engine_in_ingress).

A dead engine (its core process crashed, was killed, ran out of memory) is restarted in
place, in this replica: the replica keeps answering meanwhile (503 with Retry-After), so its
port and its queue survive. The replica reports unhealthy, so that Serve replaces it, only
when that restart keeps failing, or when the engine is stuck: requests in flight and no
output for engine.stall_timeout_s."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from contextlib import aclosing
from typing import Any

import numpy as np
import ray
from ray.exceptions import ObjectLostError

from deployments.contract import EngineRequest, PreparedImage
from deployments.logs import keep_serve_log_handlers, quiet_client_errors
from handlers.config import IrisConfig
from handlers.cpu_affinity import engine_process_cores, pinned
from handlers.engine import VllmChatEngine
from handlers.errors import EngineUnavailable, PixelsLost
from handlers.events import EventStream
from handlers.stream_batch import batch_sse

logger = logging.getLogger("ray.serve.iris.engine")

WATCH_PERIOD_S = 1.0


class EngineHost:
    def __init__(
        self, config: IrisConfig, engine: VllmChatEngine,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._cfg = config
        self._engine = engine
        self._clock = clock
        self._batch_s = config.http.stream_batch_ms / 1000
        self._state = "ready"  # ready | restarting | failed
        self._down_since: float | None = None
        self._failed_restarts = 0
        self._last_output = clock()
        self._restarts = 0
        self._watcher: asyncio.Task[None] | None = None

    @classmethod
    async def start(cls, config: IrisConfig) -> EngineHost:
        host = cls(config, await start_engine(config))
        host._watcher = asyncio.get_running_loop().create_task(host._watch())
        return host

    # -- requests ------------------------------------------------------------------------

    async def chat(self, request: EngineRequest) -> EventStream:
        """The engine's events for one request. Raises EngineUnavailable while the engine is
        down, PixelsLost (before any output) when an image's pixels are gone."""
        engine = self._serving_engine()
        pairs = await self._pixels(request.images)
        try:
            async with aclosing(batch_sse(engine.chat(request.body, pairs),
                                          self._batch_s)) as events:
                async for event in events:
                    self._last_output = self._clock()
                    yield event
        except EngineUnavailable:
            self._engine_died(engine)
            raise

    def _serving_engine(self) -> VllmChatEngine:
        if self._state != "ready" or self._engine.errored:
            self._engine_died(self._engine)
            raise EngineUnavailable.restarting()
        return self._engine

    async def _pixels(self, images: list[PreparedImage]) -> list[tuple[np.ndarray, str]]:
        """The images' pixels from the object store (zero-copy on this node)."""
        if not images:
            return []
        got = await asyncio.gather(*(img.pixels for img in images), return_exceptions=True)
        lost = [img.uuid for img, arr in zip(images, got, strict=True)
                if isinstance(arr, ObjectLostError)]
        if lost:
            raise PixelsLost(lost)
        for arr in got:
            if isinstance(arr, BaseException):
                raise arr
        return [(arr, img.uuid) for arr, img in zip(got, images, strict=True)]  # type: ignore[misc]

    # -- health --------------------------------------------------------------------------

    async def check_health(self) -> None:
        """Raises (so Serve replaces the replica) when the engine cannot be brought back
        here: its restarts keep failing, or it is stuck."""
        if self._state == "failed":
            raise RuntimeError("the engine is dead and restarting it here failed")
        if self._state == "ready" and self._stalled():
            raise RuntimeError(
                f"the engine has produced nothing for {self._cfg.engine.stall_timeout_s:g} s "
                "with requests in flight"
            )

    def ready(self) -> bool:
        return self._state == "ready" and not self._engine.errored

    def _stalled(self) -> bool:
        if self._engine.num_unfinished() == 0:
            self._last_output = self._clock()
            return False
        return self._clock() - self._last_output > self._cfg.engine.stall_timeout_s

    def stats(self) -> dict[str, Any]:
        return {
            "unfinished_requests": self._engine.num_unfinished(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "engine_state": self._state,
            "engine_restarts": self._restarts,
            "engine_pids": self._engine.pids(),
            **self._engine.cache_stats(),
        }

    # -- restarts ------------------------------------------------------------------------

    def _engine_died(self, engine: VllmChatEngine) -> None:
        if self._state == "ready" and engine is self._engine and engine.errored:
            logger.error("the vLLM engine died; restarting it in this replica")
            self._state = "restarting"
            self._down_since = self._clock()

    async def _watch(self) -> None:
        """Notice a dead engine even when no request does, and bring it back."""
        while True:
            await asyncio.sleep(WATCH_PERIOD_S)
            try:
                self._engine_died(self._engine)
                if self._state == "restarting":
                    await self._restart()
            except Exception:
                logger.exception("engine watchdog failed")

    async def _restart(self) -> None:
        with contextlib.suppress(Exception):
            self._engine.shutdown()  # ends whatever is left of its processes
        try:
            self._engine = await start_engine(self._cfg)
        except Exception:
            self._failed_restarts += 1
            logger.exception("restarting the engine failed (%d in a row)", self._failed_restarts)
            if self._failed_restarts >= self._cfg.engine.restart_attempts:
                self._state = "failed"
            return
        down = self._clock() - (self._down_since or self._clock())
        self._state, self._failed_restarts, self._down_since = "ready", 0, None
        self._restarts += 1
        self._last_output = self._clock()
        logger.warning("the vLLM engine is back after %.0f s", down)

    async def shutdown(self) -> None:
        """Stop the watchdog and the engine's processes (replica stopping)."""
        if self._watcher is not None:
            self._watcher.cancel()
        self._engine.shutdown()


async def start_engine(config: IrisConfig) -> VllmChatEngine:
    """Start vLLM in this process, its core process on the cores Iris gave it."""
    os.environ.update(config.engine.env)
    cores = engine_process_cores(config.engine, dict(os.environ))
    with keep_serve_log_handlers(), pinned(cores):
        engine = await VllmChatEngine.start(config)
    quiet_client_errors()  # after vLLM's logging setup
    return engine
