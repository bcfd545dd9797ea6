"""EngineHost: one vLLM chat engine in this process, kept alive (deployments.supervisor), and
the chat calls it answers. Both layouts use it: the LLMServer replica, and ChatIngress's own
engine (deployments.engine_in_ingress)."""

from __future__ import annotations

import os
from contextlib import aclosing
from typing import Any

import ray

from deployments.contract import EngineRequest
from deployments.logs import keep_serve_log_handlers, quiet_client_errors
from deployments.supervisor import Supervisor
from handlers.config import IrisConfig
from handlers.cpu_affinity import engine_process_cores, pinned, worker_bind, worker_threads
from handlers.engine import VllmChatEngine
from handlers.errors import EngineUnavailable
from handlers.events import EventStream
from handlers.stream_batch import batch_sse


class EngineHost:
    def __init__(self, config: IrisConfig, supervisor: Supervisor[VllmChatEngine]) -> None:
        self._batch_s = config.http.stream_batch_ms / 1000
        self._engine = supervisor

    @classmethod
    async def start(cls, config: IrisConfig) -> EngineHost:
        e = config.engine
        supervisor = Supervisor(await start_engine(config), lambda: start_engine(config),
                                stall_timeout_s=e.stall_timeout_s,
                                restart_attempts=e.restart_attempts)
        supervisor.watch()
        return cls(config, supervisor)

    async def chat(self, request: EngineRequest) -> EventStream:
        """The engine's events for one request. Raises EngineUnavailable while the engine is
        down."""
        engine = self._engine.serving()
        pairs = [(img.pixels, img.uuid) for img in request.images]
        try:
            async with aclosing(batch_sse(engine.chat(request.body, pairs),
                                          self._batch_s)) as events:
                async for event in events:
                    self._engine.progressed()
                    yield event
        except EngineUnavailable:
            self._engine.died(engine)
            raise

    async def check_health(self) -> None:
        await self._engine.check_health()

    def ready(self) -> bool:
        return self._engine.ready()

    def stats(self) -> dict[str, Any]:
        engine = self._engine.engine
        return {
            "unfinished_requests": engine.num_unfinished(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "engine_state": self._engine.state,
            "engine_restarts": self._engine.restarts,
            "engine_pids": engine.pids(),
            **engine.cache_stats(),
        }

    async def shutdown(self) -> None:
        await self._engine.shutdown()


async def start_engine(config: IrisConfig) -> VllmChatEngine:
    """Start vLLM in this process: its core process on the cores Iris gave the engine, its
    worker's threads there and (engine.cpu_worker_threads) beside the replicas."""
    os.environ.update(config.engine.env)
    cores = engine_process_cores(config.engine, dict(os.environ))
    threads = worker_threads(config.engine, cores)
    with keep_serve_log_handlers(), pinned(cores), worker_bind(threads):
        engine = await VllmChatEngine.start(config)
    quiet_client_errors()  # after vLLM's logging setup
    return engine
