"""Shared test doubles: DNS resolvers, a recording network backend, a counting S3 client."""

from __future__ import annotations

import threading
import typing
from collections import Counter
from collections.abc import Callable
from typing import Any

import httpcore


class FakeResolver:
    """Maps names to address lists; counts lookups. Unknown names fail like NXDOMAIN."""

    def __init__(self, table: dict[str, list[str] | list[list[str]]]) -> None:
        # A list of lists answers differently on each lookup (DNS rebinding).
        self.table = table
        self.calls: Counter[str] = Counter()

    async def __call__(self, host: str, port: int) -> list[str]:
        self.calls[host] += 1
        answer = self.table.get(host)
        if answer is None:
            raise OSError(f"no such host: {host}")
        if answer and isinstance(answer[0], list):
            rounds = typing.cast(list[list[str]], answer)
            return rounds[min(self.calls[host], len(rounds)) - 1]
        return typing.cast(list[str], answer)


class RerouteBackend(httpcore.AsyncNetworkBackend):
    """Records where the guard dials and sends every connection to one loopback port.

    Stands in for "the internet" so a public address can be used without real traffic.
    """

    def __init__(self, port: int) -> None:
        self.port = port
        self.dialled: list[tuple[str, int]] = []
        self._inner = httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's interface)
        local_address: str | None = None,
        socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        self.dialled.append((host, port))
        return await self._inner.connect_tcp("127.0.0.1", self.port, timeout=timeout)

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class CountingS3:
    """Wraps a real boto3 S3 client: counts calls, can fail or rewrite responses on cue.

    fail["get_object"] = [exc, exc] raises those on the next two calls, then passes through.
    rewrite["head_object"] = fn(response) -> response edits what the caller sees.
    """

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.calls: Counter[str] = Counter()
        self.fail: dict[str, list[BaseException]] = {}
        self.rewrite: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {}
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._inner, name)
        if not callable(method):
            return method

        def call(*args: Any, **kwargs: Any) -> Any:
            with self._lock:
                self.calls[name] += 1
                pending = self.fail.get(name)
                exc = pending.pop(0) if pending else None
            if exc is not None:
                raise exc
            out = method(*args, **kwargs)
            fn = self.rewrite.get(name)
            return fn(out) if fn is not None else out

        return call


def client_error(code: str, status: int, operation: str = "GetObject") -> Exception:
    from botocore.exceptions import ClientError

    return ClientError(
        {"Error": {"Code": code, "Message": code},
         "ResponseMetadata": {"HTTPStatusCode": status}},
        operation,
    )


class ScriptedEvents:
    """An engine's event stream (what ChatBackend.chat returns): yields `events`, then raises
    `fail` (if given) or waits forever (`hang=True`); records that it was closed, which is
    where a real engine request is aborted."""

    def __init__(self, events: list[Any], fail: BaseException | None = None,
                 hang: bool = False) -> None:
        self._events = list(events)
        self._fail = fail
        self._hang = hang
        self.closed = False

    def __aiter__(self) -> ScriptedEvents:
        return self

    async def __anext__(self) -> Any:
        import asyncio

        if self.closed:
            raise StopAsyncIteration
        try:
            if self._events:
                return self._events.pop(0)
            if self._fail is not None:
                raise self._fail
            if self._hang:
                await asyncio.Event().wait()
        except BaseException:
            self.closed = True  # an async generator is finished once it raised
            raise
        raise StopAsyncIteration

    async def aclose(self) -> None:
        self.closed = True


class FakeEngineHost:
    """Stands in for deployments.engine_host.EngineHost in backend unit tests: each chat
    yields the next script's events (then waits, if `hang`), and records when its stream
    was closed (where a real engine request is aborted)."""

    def __init__(self, scripts: list[list[Any]], hang: bool = False) -> None:
        self._scripts = list(scripts)
        self._hang = hang
        self.closed = 0
        self.healthy = True

    async def chat(self, request: Any) -> Any:
        import asyncio

        events = self._scripts.pop(0)
        try:
            for event in events:
                yield event
            if self._hang:
                await asyncio.Event().wait()
        finally:
            self.closed += 1

    def ready(self) -> bool:
        return self.healthy

    async def check_health(self) -> None:
        if not self.healthy:
            raise RuntimeError("unhealthy")

    def stats(self) -> dict[str, Any]:
        return {"unfinished_requests": 0}

    async def shutdown(self) -> None:
        pass


class FakeEncoderHost:
    """Stands in for deployments.embedding_server.EncoderHost in encoder unit tests: ready or
    not (its engine restarting), and CLIP's temperature."""

    def __init__(self, ready: bool, logit_scale: float | None = 100.0) -> None:
        self._ready = ready
        self._logit_scale = logit_scale

    def ready(self) -> bool:
        return self._ready

    def logit_scale(self) -> float | None:
        return self._logit_scale


class FakeStreamingHandle:
    """Stands in for a DeploymentHandle in ServeBackend unit tests: `.options(stream=True)
    .chat.remote(request)` returns an async iterator over `events`, then raises `fail`;
    records cancel(). The first `lost_calls` calls raise `lost` (a dead replica's error)
    before any event."""

    def __init__(self, events: list[Any], fail: BaseException | None = None,
                 lost_calls: int = 0, lost: BaseException | None = None) -> None:
        self._events = events
        self._fail = fail
        self._lost_calls = lost_calls
        self._lost = lost
        self.cancelled = False
        self.chat = self
        self.calls: list[Any] = []

    def options(self, **_: Any) -> FakeStreamingHandle:
        return self

    def remote(self, request: Any) -> Any:
        self.calls.append(request)
        outer = self
        lost = outer._lost if len(self.calls) <= outer._lost_calls else None

        class Stream:
            def __init__(self) -> None:
                self._events = list(outer._events)

            def __aiter__(self) -> Any:
                return self

            async def __anext__(self) -> Any:
                if lost is not None:
                    raise lost
                if self._events:
                    return self._events.pop(0)
                if outer._fail is not None:
                    raise outer._fail
                raise StopAsyncIteration

            def cancel(self) -> None:
                outer.cancelled = True

        return Stream()


class FakeCallHandle:
    """Stands in for a DeploymentHandle whose methods answer one value:
    `handle.<method>.remote(*args)` raises the next of `errors` (a dead replica's, a remote
    refusal), then answers `answers[method]`. Records every call."""

    def __init__(self, answers: dict[str, Any], errors: list[BaseException] | None = None
                 ) -> None:
        self._answers = answers
        self._errors = list(errors or [])
        self.calls: list[tuple[str, tuple[Any, ...]]] = []

    def __getattr__(self, method: str) -> Any:
        outer = self

        class Method:
            def remote(self, *args: Any) -> Any:
                outer.calls.append((method, args))

                async def answer() -> Any:
                    if outer._errors:
                        raise outer._errors.pop(0)
                    return outer._answers[method]

                return answer()

        return Method()


class EngineStandIn:
    """What handlers.engine.InProcessEngine reads of vLLM's AsyncLLM: its errored flag, its
    core processes (real ones, started by the test) and the output processor's error
    propagation (recorded)."""

    def __init__(self, pids: list[int]) -> None:
        from types import SimpleNamespace

        self.errored = False  # what vLLM's monitor thread would set
        self.propagated: list[BaseException] = []
        manager = SimpleNamespace(processes=[SimpleNamespace(pid=p) for p in pids])
        self.engine_core = SimpleNamespace(resources=SimpleNamespace(engine_manager=manager))
        self.output_processor = SimpleNamespace(propagate_error=self.propagated.append)

    def get_num_unfinished_requests(self) -> int:
        return 0

    def shutdown(self) -> None:
        pass


class SupervisedEngine:
    """An engine for deployments.supervisor tests: dies when told, records what the
    supervisor did to it, in order."""

    def __init__(self) -> None:
        self.errored = False
        self.calls: list[str] = []

    def pids(self) -> list[int]:
        return []

    def num_unfinished(self) -> int:
        return 0

    def fail_in_flight(self) -> None:
        self.calls.append("fail_in_flight")

    def shutdown(self) -> None:
        self.calls.append("shutdown")
