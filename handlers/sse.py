"""Relaying a streamed answer to the client as server-sent events."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable

from handlers.errors import InternalError, IrisError, RequestTimeout, to_error
from handlers.events import EventStream, SseChunk

DONE = "data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def error_frames(err: IrisError) -> str:
    """How a failure after the first byte reaches the client: Iris's envelope, then [DONE]."""
    return f"data: {json.dumps(err.envelope())}\n\n{DONE}"


async def relay(
    first: str,
    events: EventStream,
    deadline: float,
    *,
    on_error: Callable[[IrisError], None],
    on_done: Callable[[], None],
    clock: Callable[[], float] = time.monotonic,
) -> AsyncIterator[str]:
    """`first`, then every chunk of `events`, until the stream ends or `deadline` (on `clock`)
    passes. A failure becomes an error event (error_frames). However the relay ends (done,
    failed, or the client gone), `events` is closed, which stops the engine request."""
    try:
        yield first
        while True:
            remaining = deadline - clock()
            if remaining <= 0:
                raise RequestTimeout.past_deadline()
            try:
                event = await asyncio.wait_for(anext(events), remaining)
            except StopAsyncIteration:
                break
            except TimeoutError:
                raise RequestTimeout.past_deadline() from None
            if not isinstance(event, SseChunk):
                raise InternalError("The engine answered a streamed request with JSON.")
            yield event.text
        on_done()
    except Exception as exc:
        err = to_error(exc)
        on_error(err)
        yield error_frames(err)
    finally:
        await events.aclose()
