"""LLMServer: one vLLM engine per replica (EngineHost), serving chat with vLLM's own code.
The production layout; with deployments.engine_in_ingress the same EngineHost runs inside
ChatIngress instead (deployments/backend.py)."""

from __future__ import annotations

from contextlib import aclosing

from ray import serve

from deployments.contract import EngineRequest
from deployments.engine_host import EngineHost
from deployments.logs import behind_the_ingress
from deployments.supervisor import EngineReplica
from handlers.config import IrisConfig
from handlers.cpu_affinity import to_replica_cores
from handlers.events import EventStream


@serve.deployment(name="LLMServer")
class LLMServer(EngineReplica):
    _host: EngineHost

    async def __init__(self, config: IrisConfig) -> None:  # type: ignore[misc]  # Serve awaits it
        to_replica_cores()
        self._host = await EngineHost.start(config)
        behind_the_ingress()

    async def chat(self, request: EngineRequest) -> EventStream:
        """The engine's events for one request; errors are raised (the caller gets them)."""
        async with aclosing(self._host.chat(request)) as events:
            async for event in events:
                yield event
