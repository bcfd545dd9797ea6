"""Stream batching: the first burst goes at once, later chunks travel together, order and
errors are kept, and a consumer that leaves stops the producer."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from handlers.errors import IrisError
from handlers.stream_batch import batch_sse


async def timed(script: list[tuple[float, tuple[str, Any]]], fail: Exception | None = None,
                stopped: list[bool] | None = None) -> AsyncIterator[tuple[str, Any]]:
    """Yields each event after its delay (seconds); then raises `fail`, if given."""
    try:
        for delay, event in script:
            if delay:
                await asyncio.sleep(delay)
            yield event
        if fail is not None:
            raise fail
    finally:
        if stopped is not None:
            stopped.append(True)


async def collect(events: AsyncIterator[tuple[str, Any]]) -> list[tuple[float, Any]]:
    t0 = time.monotonic()
    return [(time.monotonic() - t0, ev) async for ev in events]


async def test_zero_interval_passes_every_event_through() -> None:
    script = [(0, ("sse", "a")), (0, ("sse", "b")), (0.01, ("sse", "c"))]
    got = [ev for _, ev in await collect(batch_sse(timed(script), 0))]
    assert got == [ev for _, ev in script]


async def test_first_burst_at_once_then_chunks_within_the_window_joined() -> None:
    script = [(0, ("sse", "role|")), (0, ("sse", "tok1|")),  # one engine step
              (0.01, ("sse", "tok2|")), (0.01, ("sse", "tok3|")), (0.01, ("sse", "[DONE]"))]
    got = await collect(batch_sse(timed(script), 0.2))
    assert [ev for _, ev in got] == [("sse", "role|tok1|"), ("sse", "tok2|tok3|[DONE]")]
    assert got[0][0] < 0.05  # time to first token is not held back by the window


async def test_a_slow_stream_is_sent_once_per_window() -> None:
    script = [(0, ("sse", "0"))] + [(0.03, ("sse", str(i))) for i in range(1, 9)]
    got = [ev[1] for _, ev in await collect(batch_sse(timed(script), 0.1))]
    assert "".join(got) == "012345678"
    assert 3 <= len(got) <= 5  # ~240 ms of chunks in 100 ms windows, not 9 messages


async def test_other_events_keep_their_place_and_errors_end_the_stream() -> None:
    script = [(0, ("sse", "a")), (0.01, ("sse", "b")), (0, ("error", IrisError("late")))]
    got = [ev for _, ev in await collect(batch_sse(timed(script), 0.2))]
    assert got[:2] == [("sse", "a"), ("sse", "b")] and got[2][0] == "error"

    boom = [ev for _, ev in await collect(
        batch_sse(timed([(0, ("sse", "a")), (0.01, ("sse", "b"))], fail=RuntimeError("x")), 0.2))]
    assert boom[:2] == [("sse", "a"), ("sse", "b")]
    assert boom[2][0] == "error" and isinstance(boom[2][1], IrisError) and len(boom) == 3


async def test_json_answer_passes_untouched() -> None:
    got = [ev for _, ev in await collect(batch_sse(timed([(0, ("json", {"id": 1}))]), 0.05))]
    assert got == [("json", {"id": 1})]


async def test_consumer_leaving_stops_the_producer() -> None:
    stopped: list[bool] = []
    script = [(0, ("sse", "a"))] + [(0.05, ("sse", "x"))] * 100
    stream = batch_sse(timed(script, stopped=stopped), 0.01)
    assert await stream.__anext__() == ("sse", "a")
    await stream.aclose()
    for _ in range(50):
        if stopped:
            break
        await asyncio.sleep(0.01)
    assert stopped == [True]
