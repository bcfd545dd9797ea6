"""The chat backend: where ChatIngress sends a prepared request, and the one interface the
ingress sees for both layouts.

- InProcessBackend: the engine runs in the ingress replica (deployments.engine_in_ingress,
  one Serve hop less). Admission applies deployments.llm's max_ongoing_requests /
  max_queued_requests here, as Serve's queue does in front of LLMServer, with Iris's own
  envelope on the 503 (Serve's own limits on the ingress would also hold /health and
  /v1/models behind streams, and answer outside the envelope).
- ServeBackend: the engine runs in the LLMServer deployment, reached through its handle;
  a call whose replica died before answering goes again.

Either way `chat` yields typed events and raises IrisError; closing the stream it returns
stops the engine request."""

from __future__ import annotations

import time
from contextlib import aclosing
from typing import Any, Protocol, cast

from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from deployments.contract import EngineRequest
from deployments.engine_host import EngineHost
from deployments.ray_errors import client_error, replica_gone
from deployments.retry import before_retry
from handlers.admission import Admission
from handlers.config import IrisConfig
from handlers.errors import EngineUnavailable, ModelNotFound
from handlers.events import EngineEvent, EventStream, JsonAnswer


class ChatBackend(Protocol):
    def chat(self, request: EngineRequest) -> EventStream: ...

    async def ready(self) -> None:
        """Raises when the engine cannot serve now (loading, restarting): /ready."""

    async def check_health(self) -> None:
        """Raises when the replica holding the engine should be replaced: Serve's health
        check of ChatIngress (a no-op when the engine lives in LLMServer)."""

    async def stats(self) -> dict[str, Any]:
        """The load and counters of the engine in this replica ({} if it holds none)."""

    async def shutdown(self) -> None: ...


class InProcessBackend:
    def __init__(self, host: EngineHost, admission: Admission) -> None:
        self._host = host
        self._admission = admission

    @classmethod
    async def start(cls, config: IrisConfig) -> InProcessBackend:
        llm = config.deployments.llm
        return cls(await EngineHost.start(config),
                   Admission(llm.max_ongoing_requests or 1 << 30, llm.max_queued_requests))

    async def chat(self, request: EngineRequest) -> EventStream:
        # aclosing: closing this stream closes the engine's at once (not at garbage
        # collection), which aborts the engine request and frees the slot.
        async with self._admission.slot(), aclosing(self._host.chat(request)) as events:
            async for event in events:
                yield event

    async def ready(self) -> None:
        if not self._host.ready():
            raise RuntimeError("the engine is not ready")

    async def check_health(self) -> None:
        await self._host.check_health()

    async def stats(self) -> dict[str, Any]:
        return self._host.stats()

    async def shutdown(self) -> None:
        await self._host.shutdown()


class ServeBackend:
    def __init__(self, llm: DeploymentHandle, retry_for_s: float) -> None:
        self._llm = llm
        self._retry_for_s = retry_for_s

    async def chat(self, request: EngineRequest) -> EventStream:
        """The LLMServer call's events. If its replica dies before the first event, nothing
        reached the client: the call goes again (to another replica, or the replacement
        once Serve has started it) within `retry_for_s`. After that the answer is cut:
        the client gets engine_unavailable."""
        deadline = time.monotonic() + self._retry_for_s
        attempt = 0
        while True:
            gen = cast(DeploymentResponseGenerator[EngineEvent],  # stream=True: a generator
                       self._llm.options(stream=True).chat.remote(request))
            finished = begun = False
            try:
                event: EngineEvent
                async for event in gen:
                    # A JSON answer is the whole answer: the call is done, nothing to cancel.
                    finished = isinstance(event, JsonAnswer)
                    begun = True
                    yield event
                finished = True
                return
            except Exception as exc:
                if not replica_gone(exc):
                    raise client_error(exc) from None
                if begun:
                    raise EngineUnavailable.lost_mid_answer() from None
                attempt += 1
                if not await before_retry("engine", exc, attempt, deadline):
                    raise EngineUnavailable.restarting() from None
            finally:
                if not finished:
                    gen.cancel()  # the client went away or we failed: stop the engine request

    async def ready(self) -> None:
        await self._llm.ready.remote()

    async def check_health(self) -> None:
        """This replica holds no engine: LLMServer's replicas report their own."""

    async def stats(self) -> dict[str, Any]:
        return {}  # LLMServer's replicas report their own

    async def shutdown(self) -> None:
        pass


class NoChatBackend:
    """The app serves no chat model (serve_chat: false): only the encoder."""

    async def chat(self, request: EngineRequest) -> EventStream:
        raise ModelNotFound("This server has no chat model.", param="model")
        yield  # an async generator, like the others

    async def ready(self) -> None:
        pass

    async def check_health(self) -> None:
        pass

    async def stats(self) -> dict[str, Any]:
        return {}

    async def shutdown(self) -> None:
        pass


async def start_backend(config: IrisConfig, llm: DeploymentHandle | None
                        ) -> InProcessBackend | ServeBackend | NoChatBackend:
    """The backend for this layout: LLMServer's handle if the app has one, else an engine here
    (or none, when no chat model is served)."""
    if not config.serve_chat:
        return NoChatBackend()
    if llm is None:
        return await InProcessBackend.start(config)
    return ServeBackend(llm, config.limits.request_timeout_s)
