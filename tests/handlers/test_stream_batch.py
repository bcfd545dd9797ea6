"""Stream batching: the first burst goes at once, later chunks travel together, order and
errors are kept, and a consumer that leaves stops the producer. Time is a fake clock that
the scripted engine moves: no test depends on how fast this machine is."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

import pytest

from handlers.errors import IrisError
from handlers.events import EngineEvent, JsonAnswer, SseChunk
from handlers.stream_batch import batch_sse


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def scripted(clock: Clock, script: list[tuple[float, EngineEvent]],
                   fail: Exception | None = None) -> AsyncGenerator[EngineEvent, None]:
    """Each event produced at its time (seconds on `clock`); then `fail`, if given. Nothing
    here waits, so every event is queued before the batcher looks."""
    for at, event in script:
        clock.now = at
        yield event
    if fail is not None:
        raise fail


def sse(*texts: str) -> list[str]:
    return list(texts)


async def texts(stream: AsyncGenerator[EngineEvent, None]) -> list[str]:
    return [e.text for e in [ev async for ev in stream] if isinstance(e, SseChunk)]


async def test_zero_interval_passes_every_event_through() -> None:
    clock = Clock()
    script = [(0.0, SseChunk("a")), (0.0, SseChunk("b")), (0.01, SseChunk("c"))]
    assert await texts(batch_sse(scripted(clock, script), 0, clock)) == sse("a", "b", "c")


async def test_first_burst_alone_then_chunks_within_the_window_joined() -> None:
    clock = Clock()
    script = [(0.0, SseChunk("role|")), (0.0, SseChunk("tok1|")),  # one engine step
              (0.01, SseChunk("tok2|")), (0.02, SseChunk("tok3|")), (0.03, SseChunk("[DONE]"))]
    got = await texts(batch_sse(scripted(clock, script), 0.2, clock))
    # The first message holds only the first step: time to first token is not held back.
    assert got == sse("role|tok1|", "tok2|tok3|[DONE]")


async def test_a_slow_stream_is_sent_once_per_window() -> None:
    clock = Clock()
    script = [(0.03 * i, SseChunk(str(i))) for i in range(9)]  # a chunk every 30 ms
    got = await texts(batch_sse(scripted(clock, script), 0.1, clock))
    assert got == sse("0", "1234", "5678")  # 100 ms windows from each message's first chunk


async def test_errors_end_the_stream_after_the_chunks_before_them() -> None:
    clock = Clock()
    stream = batch_sse(scripted(clock, [(0.0, SseChunk("a")), (0.01, SseChunk("b"))],
                                fail=IrisError("late")), 0.2, clock)
    got = [await stream.__anext__(), await stream.__anext__()]
    assert [e.text for e in got if isinstance(e, SseChunk)] == ["a", "b"]
    with pytest.raises(IrisError, match="late"):
        await stream.__anext__()


async def test_json_answer_passes_untouched() -> None:
    clock = Clock()
    got = [e async for e in batch_sse(scripted(clock, [(0.0, JsonAnswer({"id": 1}))]), 0.05,
                                      clock)]
    assert got == [JsonAnswer({"id": 1})]


async def test_consumer_leaving_stops_the_producer() -> None:
    stopped = asyncio.Event()
    more = asyncio.Event()

    async def engine() -> AsyncGenerator[EngineEvent, None]:
        try:
            yield SseChunk("a")
            await more.wait()  # never set: the engine is still generating
            yield SseChunk("x")
        finally:
            stopped.set()  # where the engine request is aborted

    stream = batch_sse(engine(), 0.01)
    assert await stream.__anext__() == SseChunk("a")
    await stream.aclose()
    await asyncio.wait_for(stopped.wait(), 10)  # a guard, not a timing assertion
