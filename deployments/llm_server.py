"""LLMServer: one vLLM engine per replica (EngineHost), serving chat with vLLM's own code.
The production layout; with deployments.engine_in_ingress the same EngineHost runs inside
ChatIngress instead (deployments/backend.py)."""

from __future__ import annotations

from contextlib import aclosing
from typing import Any

from ray import serve

from deployments.contract import EngineRequest
from deployments.engine_host import EngineHost
from deployments.logs import access_lines_to_file_only
from handlers.config import IrisConfig
from handlers.errors import EngineUnavailable
from handlers.events import EventStream


@serve.deployment(name="LLMServer")
class LLMServer:
    async def __init__(self, config: IrisConfig) -> None:  # type: ignore[misc]  # Serve awaits it
        self._host = await EngineHost.start(config)
        access_lines_to_file_only()  # behind the ingress: its calls stay off the console

    async def check_health(self) -> None:
        """Serve's health check: fails only when the engine cannot be brought back here."""
        await self._host.check_health()

    async def ready(self) -> None:
        if not self._host.ready():
            raise EngineUnavailable.restarting()

    async def record_routing_stats(self) -> dict[str, Any]:
        """The engine's load and counters (Serve polls this; tests and benchmarks read it
        from each replica)."""
        return self._host.stats()

    async def chat(self, request: EngineRequest) -> EventStream:
        """The engine's events for one request; errors are raised (the caller gets them)."""
        async with aclosing(self._host.chat(request)) as events:
            async for event in events:
                yield event

    async def __del__(self) -> None:
        # Serve calls this when the replica stops: end the engine's processes with it.
        await self._host.shutdown()
