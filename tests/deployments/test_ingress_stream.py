"""relay_stream's promises, with a fake engine stream and with the in-process engine's
adapter (no Ray cluster needed)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from deployments.ingress import LocalChat, relay_stream
from handlers.errors import InvalidRequest
from tests.fakes import FakeStream


async def collect(gen: FakeStream, deadline_s: float = 5.0) -> list[str]:
    now = time.monotonic()
    return [c async for c in relay_stream("data: first\n\n", gen, now + deadline_s,
                                          time.perf_counter())]


def error_event(chunks: list[str]) -> dict:  # type: ignore[type-arg]
    body = "".join(chunks)
    assert body.endswith("data: [DONE]\n\n")
    line = [ln for ln in body.split("\n\n") if ln.startswith('data: {"error"')][-1]
    return json.loads(line[6:])["error"]


async def test_chunks_are_relayed_in_order() -> None:
    gen = FakeStream([("sse", "data: a\n\n"), ("sse", "data: [DONE]\n\n")])
    assert await collect(gen) == ["data: first\n\n", "data: a\n\n", "data: [DONE]\n\n"]
    assert not gen.cancelled


async def test_failure_after_first_byte_is_an_sse_error_then_done() -> None:
    gen = FakeStream([("sse", "data: a\n\n")], fail=RuntimeError("engine died at 0xdeadbeef"))
    chunks = await collect(gen)
    err = error_event(chunks)
    assert err["type"] == "internal_error" and "0x" not in err["message"]
    assert gen.cancelled


async def test_typed_error_event_keeps_its_fields() -> None:
    gen = FakeStream([("error", InvalidRequest("bad thing", param="messages"))])
    err = error_event(await collect(gen))
    assert err["param"] == "messages" and err["type"] == "invalid_request_error"


async def test_request_outliving_its_timeout_gets_a_timeout_error() -> None:
    gen = FakeStream([("sse", "data: a\n\n")], hang=True)
    t0 = time.monotonic()
    err = error_event(await collect(gen, deadline_s=0.3))
    assert time.monotonic() - t0 < 2
    assert err["type"] == "timeout_error" and err["code"] == "request_timeout"
    assert gen.cancelled  # the engine request is stopped too


async def test_client_going_away_cancels_the_engine_stream() -> None:
    gen = FakeStream([("sse", "data: a\n\n")], hang=True)
    stream = relay_stream("data: first\n\n", gen, time.monotonic() + 30, time.perf_counter())
    assert await stream.__anext__() == "data: first\n\n"
    assert await stream.__anext__() == "data: a\n\n"
    await stream.aclose()  # what Starlette does when the client disconnects
    assert gen.cancelled


async def _engine_events(closed: asyncio.Event, hang: bool = False) -> AsyncIterator[Any]:
    """What EngineHost.chat looks like from the ingress: events, then (maybe) a wait."""
    try:
        yield ("sse", "data: a\n\n")
        if hang:
            await asyncio.Event().wait()
        yield ("sse", "data: [DONE]\n\n")
    finally:
        closed.set()  # where the engine request is aborted


async def test_in_process_engine_stream_is_relayed_like_the_serve_one() -> None:
    closed = asyncio.Event()
    chunks = await collect(LocalChat(_engine_events(closed)))  # type: ignore[arg-type]
    assert chunks == ["data: first\n\n", "data: a\n\n", "data: [DONE]\n\n"]
    assert closed.is_set()


async def test_client_going_away_closes_the_in_process_engine_stream() -> None:
    closed = asyncio.Event()
    gen = LocalChat(_engine_events(closed, hang=True))
    stream = relay_stream("data: first\n\n", gen, time.monotonic() + 30, time.perf_counter())
    assert await stream.__anext__() == "data: first\n\n"
    assert await stream.__anext__() == "data: a\n\n"
    await stream.aclose()
    await asyncio.wait_for(closed.wait(), 2)


async def test_cancel_while_the_engine_stream_is_being_read_is_harmless() -> None:
    closed = asyncio.Event()
    gen = LocalChat(_engine_events(closed, hang=True))
    assert await gen.__anext__() == ("sse", "data: a\n\n")
    reading = asyncio.ensure_future(gen.__anext__())
    await asyncio.sleep(0.05)
    gen.cancel()  # the generator is running: closing it now must not raise anywhere
    await asyncio.sleep(0.05)
    assert not closed.is_set() and not reading.done()
    reading.cancel()  # what relay_stream's timeout does to the read in flight
    with contextlib.suppress(asyncio.CancelledError):
        await reading
    await asyncio.wait_for(closed.wait(), 2)


async def test_a_json_answer_frees_the_in_process_engine_at_once() -> None:
    closed = asyncio.Event()

    async def events() -> AsyncIterator[Any]:
        try:
            yield ("json", {"choices": []})
            await asyncio.Event().wait()  # never resumed: the caller stops reading here
        finally:
            closed.set()

    gen = LocalChat(events())
    assert await gen.__anext__() == ("json", {"choices": []})
    assert closed.is_set()
