"""Keeping a vLLM engine alive in its replica (the chat engine and the encoder alike).

A dead engine (its core process crashed, was killed, ran out of memory) is restarted in
place, in this replica: the replica keeps answering meanwhile (503 with Retry-After), so its
port and its queue survive. The replica reports unhealthy, so that Serve replaces it, only
when that restart keeps failing, or when the engine is stuck: requests in flight and no
output for engine.stall_timeout_s. The engine's processes never outlive the replica
(handlers.reaper)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Generic, Protocol, TypeVar

from handlers.errors import EngineUnavailable
from handlers.reaper import Reaper, end_processes, process_tree

logger = logging.getLogger("ray.serve.iris.engine")

WATCH_PERIOD_S = 1.0


class Engine(Protocol):
    @property
    def errored(self) -> bool: ...

    def pids(self) -> list[int]: ...

    def num_unfinished(self) -> int: ...

    def fail_in_flight(self) -> None: ...

    def shutdown(self) -> None: ...


E = TypeVar("E", bound=Engine)


class Supervisor(Generic[E]):
    def __init__(
        self, engine: E, start: Callable[[], Awaitable[E]], *, stall_timeout_s: float,
        restart_attempts: int, clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.engine = engine
        self._start = start
        self._stall_s = stall_timeout_s
        self._attempts = restart_attempts
        self._clock = clock
        self.state = "ready"  # ready | restarting | failed
        self.restarts = 0
        self._failed_restarts = 0
        self._down_since: float | None = None
        self._last_output = clock()
        self._watcher: asyncio.Task[None] | None = None
        self._reaper = Reaper()
        self._reaper.watch(engine.pids())
        # The engine's processes with their workers, for _restart to end what outlives a
        # killed core: its workers are then orphans that vLLM's shutdown does not know of.
        self._tree = process_tree(engine.pids())

    def watch(self) -> None:
        """Start noticing a dead engine even when no request does, and bringing it back."""
        self._watcher = asyncio.get_running_loop().create_task(self._watch())

    def serving(self) -> E:
        """The engine, if it can serve; else EngineUnavailable (503, Retry-After)."""
        if self.state != "ready" or self.engine.errored:
            self.died(self.engine)
            raise EngineUnavailable.restarting()
        return self.engine

    def progressed(self) -> None:
        """The engine produced output (for the stall check)."""
        self._last_output = self._clock()

    def died(self, engine: E) -> None:
        if self.state == "ready" and engine is self.engine and engine.errored:
            logger.error("the vLLM engine died; restarting it in this replica")
            self.state = "restarting"
            self._down_since = self._clock()

    def ready(self) -> bool:
        return self.state == "ready" and not self.engine.errored

    async def check_health(self) -> None:
        if self.state == "failed":
            raise RuntimeError("the engine is dead and restarting it here failed")
        if self.state == "ready" and self._stalled():
            raise RuntimeError(
                f"the engine has produced nothing for {self._stall_s:g} s with requests "
                "in flight")

    def _stalled(self) -> bool:
        if self.engine.num_unfinished() == 0:
            self._last_output = self._clock()
            return False
        return self._clock() - self._last_output > self._stall_s

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(WATCH_PERIOD_S)
            try:
                self.died(self.engine)
                if self.state == "restarting":
                    await self._restart()
            except Exception:
                logger.exception("engine watchdog failed")

    async def _restart(self) -> None:
        # Requests still waiting on the dead engine answer 503 now: none waits forever on it.
        with contextlib.suppress(Exception):
            self.engine.fail_in_flight()
        with contextlib.suppress(Exception):
            self.engine.shutdown()
        left = await asyncio.to_thread(end_processes, self._tree)
        if left:
            logger.warning("ended %d process(es) left of the dead engine", left)
        self._tree = []
        self._reaper.watch([])
        try:
            self.engine = await self._start()
            self._reaper.watch(self.engine.pids())
            self._tree = process_tree(self.engine.pids())
        except Exception:
            self._failed_restarts += 1
            logger.exception("restarting the engine failed (%d in a row)", self._failed_restarts)
            if self._failed_restarts >= self._attempts:
                self.state = "failed"
            return
        down = self._clock() - (self._down_since or self._clock())
        self.state, self._failed_restarts, self._down_since = "ready", 0, None
        self.restarts += 1
        self._last_output = self._clock()
        logger.warning("the vLLM engine is back after %.0f s", down)

    async def shutdown(self) -> None:
        """Stop the watchdog and the engine's processes (replica stopping)."""
        if self._watcher is not None:
            self._watcher.cancel()
        self.engine.shutdown()
        self._reaper.watch([])
        self._reaper.close()


class EngineHostLike(Protocol):
    async def check_health(self) -> None: ...

    def ready(self) -> bool: ...

    def stats(self) -> dict[str, Any]: ...

    async def shutdown(self) -> None: ...


def require_ready(host: EngineHostLike) -> None:
    """Raises engine_unavailable (503, Retry-After) while the host's engine is loading or
    restarting."""
    if not host.ready():
        raise EngineUnavailable.restarting()


class EngineReplica:
    """Serve's hooks for a deployment whose replica holds one supervised engine
    (LLMServer's EngineHost, EmbeddingServer's EncoderHost)."""

    _host: EngineHostLike

    async def check_health(self) -> None:
        """Serve's health check: fails only when the engine cannot be brought back here."""
        await self._host.check_health()

    async def ready(self) -> None:
        require_ready(self._host)

    async def record_routing_stats(self) -> dict[str, Any]:
        """The engine's load and counters (Serve polls this; tests and benchmarks read it
        from each replica)."""
        return self._host.stats()

    async def __del__(self) -> None:
        # Serve calls this when the replica stops: end the engine's processes with it.
        await self._host.shutdown()
