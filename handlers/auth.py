"""Bearer-key auth as a plain ASGI middleware (no framework routing involved, so no
route, method or trailing-slash variant can slip past it). Request ids are Ray Serve's
own: its proxy (or, with direct ingress, the ingress replica) accepts or generates
`x-request-id`, echoes it and logs it per replica."""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from handlers.errors import AuthenticationFailed

Scope = dict[str, Any]
ASGIApp = Callable[[Scope, Callable[..., Awaitable[Any]], Callable[..., Awaitable[Any]]],
                   Awaitable[None]]

# Liveness only; readiness and everything else need the key.
PUBLIC_PATHS = frozenset({"/health"})


def bearer_ok(header: str | None, keys: Iterable[bytes]) -> bool:
    """Constant-time check of `Authorization: Bearer <key>` against every key."""
    if not header:
        return False
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    candidate = token.strip().encode()
    ok = False
    for key in keys:
        # No early exit: the time taken does not say which key (or how much) matched.
        ok |= hmac.compare_digest(candidate, key)
    return ok


class BearerAuth:
    """Rejects unauthenticated requests with OpenAI's 401 envelope."""

    def __init__(self, app: ASGIApp, keys: Callable[[], list[bytes] | None]) -> None:
        self.app = app
        self._keys = keys

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        keys = self._keys()
        if keys and _route(scope) not in PUBLIC_PATHS and not bearer_ok(
            _header(scope, b"authorization"), keys
        ):
            err = AuthenticationFailed(
                "Missing or invalid API key. Send it as 'Authorization: Bearer <key>'."
            )
            body = json.dumps(err.envelope()).encode()
            await send({"type": "http.response.start", "status": 401, "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"www-authenticate", b"Bearer"),
            ]})
            await send({"type": "http.response.body", "body": body})
            return

        await self.app(scope, receive, send)


def _route(scope: Scope) -> str:
    """The path within the app: an app under a route prefix (Serve's root_path) sees it
    in front of every path."""
    path = str(scope.get("path", ""))
    prefix = str(scope.get("root_path", "")).rstrip("/")
    return path[len(prefix):] or "/" if prefix and path.startswith(prefix + "/") else path


def _header(scope: Scope, name: bytes) -> str | None:
    for k, v in scope.get("headers", []):
        if k.lower() == name:
            return str(v.decode("latin-1"))
    return None
