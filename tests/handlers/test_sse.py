"""relay's promises: chunks in order; a failure after the first byte is Iris's envelope then
[DONE]; the deadline; and the engine stream closed however the relay ends."""

from __future__ import annotations

import json
from typing import Any

from handlers.errors import InvalidRequest, IrisError
from handlers.events import JsonAnswer, SseChunk
from handlers.sse import relay
from tests.fakes import ScriptedEvents


class Recorder:
    def __init__(self) -> None:
        self.errors: list[IrisError] = []
        self.done = 0

    def on_error(self, err: IrisError) -> None:
        self.errors.append(err)

    def on_done(self) -> None:
        self.done += 1


async def collect(events: ScriptedEvents, deadline: float = 100.0,
                  now: float = 0.0) -> tuple[list[str], Recorder]:
    rec = Recorder()
    chunks = [c async for c in relay("data: first\n\n", events, deadline,
                                     on_error=rec.on_error, on_done=rec.on_done,
                                     clock=lambda: now)]
    return chunks, rec


def error_event(chunks: list[str]) -> dict[str, Any]:
    body = "".join(chunks)
    assert body.endswith("data: [DONE]\n\n")
    line = [ln for ln in body.split("\n\n") if ln.startswith('data: {"error"')][-1]
    err: dict[str, Any] = json.loads(line[6:])["error"]
    return err


async def test_chunks_are_relayed_in_order_and_the_stream_closed() -> None:
    events = ScriptedEvents([SseChunk("data: a\n\n"), SseChunk("data: [DONE]\n\n")])
    chunks, rec = await collect(events)
    assert chunks == ["data: first\n\n", "data: a\n\n", "data: [DONE]\n\n"]
    assert rec.done == 1 and not rec.errors and events.closed


async def test_failure_after_first_byte_is_an_sse_error_then_done() -> None:
    events = ScriptedEvents([SseChunk("data: a\n\n")], fail=RuntimeError("died at 0xdeadbeef"))
    chunks, rec = await collect(events)
    err = error_event(chunks)
    assert err["type"] == "internal_error" and "0x" not in err["message"]
    assert rec.errors and rec.errors[0].status == 500 and events.closed


async def test_a_raised_client_error_keeps_its_fields() -> None:
    events = ScriptedEvents([], fail=InvalidRequest("bad thing", param="messages"))
    err = error_event((await collect(events))[0])
    assert err["param"] == "messages" and err["type"] == "invalid_request_error"


async def test_a_stream_past_its_deadline_gets_a_timeout_error_and_is_stopped() -> None:
    events = ScriptedEvents([SseChunk("data: a\n\n")], hang=True)
    chunks, _ = await collect(events, deadline=10.0, now=10.0)  # the clock says: too late
    err = error_event(chunks)
    assert err["type"] == "timeout_error" and err["code"] == "request_timeout"
    assert events.closed  # the engine request is stopped too


async def test_a_stream_that_hangs_until_its_deadline_gets_a_timeout_error() -> None:
    events = ScriptedEvents([SseChunk("data: a\n\n")], hang=True)
    chunks, _ = await collect(events, deadline=0.05, now=0.0)  # waits out the last 50 ms
    assert chunks[1] == "data: a\n\n"
    assert error_event(chunks)["code"] == "request_timeout" and events.closed


async def test_a_json_answer_mid_stream_is_an_internal_error() -> None:
    events = ScriptedEvents([JsonAnswer({"id": 1})])
    assert error_event((await collect(events))[0])["type"] == "internal_error"


async def test_client_going_away_closes_the_engine_stream() -> None:
    events = ScriptedEvents([SseChunk("data: a\n\n")], hang=True)
    rec = Recorder()
    stream = relay("data: first\n\n", events, 100.0,
                   on_error=rec.on_error, on_done=rec.on_done, clock=lambda: 0.0)
    assert await stream.__anext__() == "data: first\n\n"
    assert await stream.__anext__() == "data: a\n\n"
    await stream.aclose()  # what Starlette does when the client disconnects
    assert events.closed and not rec.errors and rec.done == 0
