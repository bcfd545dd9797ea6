"""ASGI plumbing between Ray Serve and the ingress app."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from ray.exceptions import TaskCancelledError

from handlers.auth import ASGIApp, Scope

DISCONNECT = {"type": "http.disconnect"}


class CancelledReceiveIsDisconnect:
    """When a streamed response ends, Serve's proxy cancels the call that feeds the
    replica's `receive`. Starlette may still be awaiting it (it listens for disconnects
    while streaming) and would then see TaskCancelledError: an "unexpected error" logged,
    with a traceback, and counted as a 500 for a request that succeeded. For the app it is
    what it means: the client side is gone."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(
        self,
        scope: Scope,
        receive: Callable[[], Awaitable[dict[str, Any]]],
        send: Callable[..., Awaitable[Any]],
    ) -> None:
        if scope.get("type") != "http":
            await self.app(scope, receive, send)
            return

        async def receive_or_disconnect() -> dict[str, Any]:
            try:
                return await receive()
            except TaskCancelledError:
                return dict(DISCONNECT)

        await self.app(scope, receive_or_disconnect, send)
