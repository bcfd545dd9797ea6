"""relay_stream's promises, with a fake engine stream (no Ray cluster needed)."""

from __future__ import annotations

import json
import time

from deployments.ingress import relay_stream
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
