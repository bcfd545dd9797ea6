from __future__ import annotations

import asyncio
from typing import Any

import pytest
from ray.exceptions import TaskCancelledError
from starlette.applications import Starlette
from starlette.responses import StreamingResponse
from starlette.routing import Route

from deployments.asgi import CancelledReceiveIsDisconnect

# Set by receive() as it fails; the body goes on only after that, so the failure always
# lands while the response is still streaming.
RECEIVE_FAILED: dict[str, asyncio.Event] = {}


async def _stream(_: Any) -> StreamingResponse:
    async def chunks() -> Any:
        yield b"data: 1\n\n"
        await RECEIVE_FAILED["event"].wait()
        yield b"data: [DONE]\n\n"

    return StreamingResponse(chunks(), media_type="text/event-stream")


def _call(app: Any, error: type[Exception]) -> list[dict[str, Any]]:
    scope = {"type": "http", "method": "GET", "path": "/", "headers": [], "query_string": b"",
             "http_version": "1.1", "scheme": "http", "server": ("t", 80), "root_path": ""}
    sent: list[dict[str, Any]] = []
    calls = 0

    async def receive() -> dict[str, Any]:
        nonlocal calls
        calls += 1
        if calls == 1:
            return {"type": "http.request", "body": b"", "more_body": False}
        RECEIVE_FAILED["event"].set()
        raise error("Task was cancelled.")

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def run() -> None:
        RECEIVE_FAILED["event"] = asyncio.Event()
        await app(scope, receive, send)

    asyncio.run(run())
    return sent


def test_a_cancelled_receive_reads_as_a_disconnect() -> None:
    inner = Starlette(routes=[Route("/", _stream)])
    sent = _call(CancelledReceiveIsDisconnect(inner), TaskCancelledError)
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 200
    # Without the wrapper the exception escapes the app (see the next test).
    with pytest.raises(BaseException, match="cancelled"):
        _call(inner, TaskCancelledError)


def test_other_receive_errors_still_raise() -> None:
    inner = Starlette(routes=[Route("/", _stream)])
    with pytest.raises(BaseException, match="cancelled"):
        _call(CancelledReceiveIsDisconnect(inner), RuntimeError)
