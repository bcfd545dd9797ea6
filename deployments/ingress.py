"""ChatIngress: the only HTTP surface. Parse -> delegate -> map errors.

Helpers live above the deployment class: Serve ships the ingress class by value, and
module globals defined after it are not there in the replica."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from blake3 import blake3  # a third of SHA-256's time on a 9 MB body, still collision-safe
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from deployments.llm_server import EngineHost
from deployments.metrics import metrics, record_error
from deployments.preprocessor import PreparedImage
from deployments.ray_errors import client_error
from handlers import json_body
from handlers.asgi import CancelledReceiveIsDisconnect
from handlers.auth import BearerAuth
from handlers.cache import SizedLRU
from handlers.config import IrisConfig
from handlers.errors import (
    InvalidRequest,
    IrisError,
    ModelNotFound,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    RequestTimeout,
)
from handlers.protocol import (
    ImageRef,
    extract_images,
    model_card,
    model_list,
    parse_envelope,
)

logger = logging.getLogger("ray.serve")

app = FastAPI(title="Iris", docs_url=None, redoc_url=None, openapi_url=None)
app.state.api_keys = None
app.add_middleware(BearerAuth, keys=lambda: app.state.api_keys)
app.add_middleware(CancelledReceiveIsDisconnect)


def error_response(exc: BaseException) -> JSONResponse:
    err = client_error(exc)
    record_error(err)
    return JSONResponse(err.envelope(), status_code=err.status, headers=err.headers or None)


@app.exception_handler(IrisError)
async def _iris_error(_: Request, exc: IrisError) -> JSONResponse:
    return error_response(exc)


@app.exception_handler(RequestValidationError)
async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {}
    param = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
    return error_response(InvalidRequest(f"{param or 'body'}: {first.get('msg')}", param=param))


@app.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    if exc.status_code == 404:
        return error_response(NotFound("Unknown route."))
    if exc.status_code == 405:
        return error_response(InvalidRequest("Method not allowed on this route.", status=405))
    return error_response(IrisError(str(exc.detail), status=exc.status_code))


@app.exception_handler(Exception)
async def _any_error(_: Request, exc: Exception) -> JSONResponse:
    return error_response(exc)


def sse_error(exc: BaseException) -> str:
    err = client_error(exc)
    record_error(err)
    return f"data: {json.dumps(err.envelope())}\n\ndata: [DONE]\n\n"


async def relay_stream(
    first: str, gen: Any, deadline: float, started: float
) -> AsyncIterator[str]:
    """Relay SSE chunks; an error after the first byte becomes an SSE error event."""
    done = False
    try:
        yield first
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RequestTimeout("The request took longer than the server allows.")
            try:
                kind, payload = await asyncio.wait_for(gen.__anext__(), remaining)
            except StopAsyncIteration:
                break
            except TimeoutError:
                raise RequestTimeout("The request took longer than the server allows.") from None
            if kind == "error":
                yield sse_error(payload)
                break
            yield payload
        done = True
        metrics().stage("e2e", time.perf_counter() - started, stream="true")
    except Exception as exc:
        yield sse_error(exc)
    finally:
        if not done:
            gen.cancel()  # client went away or we failed: stop the engine request too


async def data_uri_key(url: str, detail: str) -> tuple[str, str]:
    """A data: URI is its own content: its hash names the prepared pixels for good."""
    if len(url) > 1 << 20:  # hashing megabytes would stall the event loop
        digest = await asyncio.to_thread(lambda: blake3(url.encode()).hexdigest())
    else:
        digest = blake3(url.encode()).hexdigest()
    return digest, detail


class LocalChat:
    """The in-process engine's events (deployments.engine_in_ingress), shaped like the Serve
    response generator of the LLMServer hop (`__anext__`, `cancel`): one code path for both."""

    def __init__(self, events: AsyncIterator[Any]) -> None:
        self._events = events

    def __aiter__(self) -> LocalChat:
        return self

    async def __anext__(self) -> Any:
        event = await self._events.__anext__()
        if event[0] != "sse":
            # A JSON answer or an error is the last event: close the stream now, which frees
            # the engine's admission slot (the caller reads no further).
            await self._events.aclose()
        return event

    def cancel(self) -> None:
        # Closing the generator runs its finally blocks, which abort the engine request.
        async def close() -> None:
            with contextlib.suppress(RuntimeError):  # still running: its cancel closes it
                await self._events.aclose()

        task = asyncio.ensure_future(close())
        _closing.add(task)  # the loop keeps only weak references to tasks
        task.add_done_callback(_closing.discard)


_closing: set[asyncio.Future[None]] = set()


def _request_id() -> str:
    """Serve's request id (the client's x-request-id, or one Serve generated)."""
    try:
        from ray.serve.context import _get_serve_request_context

        return _get_serve_request_context().request_id or uuid.uuid4().hex
    except Exception:
        return uuid.uuid4().hex


@serve.deployment(name="ChatIngress")
@serve.ingress(app)
class ChatIngress:
    async def __init__(
        self, config: IrisConfig, preprocessor: DeploymentHandle, llm: DeploymentHandle | None
    ) -> None:
        self._cfg = config
        self._model_id = config.model.id
        self._prep = preprocessor
        self._llm = llm
        # No LLMServer handle: the engine runs here (deployments.engine_in_ingress).
        self._engine = await EngineHost.start(config, in_ingress=True) if llm is None else None
        self._created = int(time.time())
        # Prepared-pixel refs of recent data: URIs. A repeat skips the preprocessor round
        # trip (~20 ms on 2 cores); holding the ref keeps the pixels in the object store.
        self._recent: SizedLRU[PreparedImage] = SizedLRU(config.imaging.cache_max_bytes)
        app.state.api_keys = (
            [k.get_secret_value().encode() for k in config.api_key] if config.api_key else None
        )

    @app.get("/health")
    async def health(self) -> dict[str, str]:
        """Liveness: this replica answers."""
        return {"status": "ok"}

    @app.get("/ready")
    async def ready(self) -> JSONResponse:
        """Readiness: the engine can serve."""
        try:
            health = (self._engine.check_health() if self._engine is not None
                      else self._llm.check_health.remote())  # type: ignore[union-attr]
            await asyncio.wait_for(health, 10)
        except Exception:
            err = Overloaded("The engine is not ready.", code="not_ready")
            return JSONResponse(err.envelope(), status_code=503)
        return JSONResponse({"status": "ready"})

    async def stats(self) -> dict[str, int | str]:
        """The engine's load, for Serve handle callers (not an HTTP route)."""
        if self._engine is not None:
            return self._engine.stats()
        return await self._llm.stats.remote()  # type: ignore[union-attr,no-any-return]

    @app.get("/v1/models")
    async def models(self) -> dict[str, Any]:
        return model_list(self._model_id, self._model_id, self._created)

    @app.get("/v1/models/{model_id:path}")
    async def model(self, model_id: str) -> dict[str, Any]:
        if model_id != self._model_id:
            raise ModelNotFound(f"The model {model_id!r} does not exist.", param="model")
        return model_card(self._model_id, self._model_id, self._created)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        deadline = time.monotonic() + self._cfg.limits.request_timeout_s
        try:
            async with asyncio.timeout(deadline - time.monotonic()):
                return await self._chat(request, deadline)
        except TimeoutError:
            raise RequestTimeout("The request took longer than the server allows.") from None
        except IrisError:
            raise
        except Exception as exc:
            # Never let a raw exception reach Starlette/Serve: Serve answers some (like
            # BackPressureError) itself, outside our envelope.
            raise client_error(exc) from None

    async def _chat(self, request: Request, deadline: float) -> Response:
        started = time.perf_counter()
        m = metrics()
        body = await self._read_json(request)
        env = parse_envelope(body)
        if env.model != self._model_id:
            raise ModelNotFound(f"The model {env.model!r} does not exist.", param="model")
        messages, refs = extract_images(env.messages, self._cfg.limits.max_images_per_request)
        m.images_per_request.observe(len(refs))
        images = list(await asyncio.gather(*(self._prepare(r) for r in refs)))
        if refs:
            m.stage("images", time.perf_counter() - started)
        total = sum(img.width * img.height for img in images)
        if total > self._cfg.limits.max_total_pixels:
            raise InvalidRequest(
                f"The request's images total {total} pixels after resizing; the limit is "
                f"{self._cfg.limits.max_total_pixels}.", param="messages", code="too_many_pixels",
            )
        body["messages"] = messages
        rid = _request_id()
        # vLLM names the engine request after this; unique even if clients reuse ids.
        body["request_id"] = f"{rid}-{uuid.uuid4().hex[:8]}"

        sent = time.perf_counter()
        gen = self._open_chat(body, images)
        try:
            kind, payload = await gen.__anext__()
            m.stage("queue", time.perf_counter() - sent)
        except StopAsyncIteration:
            raise IrisError("The engine returned nothing.") from None
        except BaseException as exc:
            gen.cancel()
            if isinstance(exc, Exception):
                raise client_error(exc) from None
            raise
        if kind == "json":
            m.stage("e2e", time.perf_counter() - started, stream="false")
            return JSONResponse(payload)
        if kind == "error":
            gen.cancel()
            raise payload
        m.stage("ttft", time.perf_counter() - started, stream="true")
        return StreamingResponse(
            relay_stream(payload, gen, deadline, started),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    def _open_chat(self, body: dict[str, Any], images: list[PreparedImage]) -> Any:
        if self._engine is not None:
            return LocalChat(self._engine.chat(body, images))
        return self._llm.options(stream=True).chat.remote(body, images)  # type: ignore[union-attr]

    async def _prepare(self, ref: ImageRef) -> PreparedImage:
        key = None
        if ref.url[:5].lower() == "data:":
            key = await data_uri_key(ref.url, ref.detail)
            hit = self._recent.get(key)
            if hit is not None:
                return hit
        try:
            prepared: PreparedImage = await self._prep.prepare.remote(ref.url, ref.detail)
            if key is not None:
                self._recent.put(key, prepared, prepared.width * prepared.height * 3)
            return prepared
        except Exception as exc:
            err = client_error(exc)
            if err.status < 500 and not err.param:
                err.with_param(ref.param + ".url")
            raise err from None

    async def _read_json(self, request: Request) -> Any:
        limit = self._cfg.limits.max_body_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise PayloadTooLarge(f"The request body is larger than {limit} bytes.")
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"The request body is larger than {limit} bytes.")
            chunks.append(chunk)
        try:
            return json_body.loads(b"".join(chunks))
        except (ValueError, UnicodeDecodeError):
            raise InvalidRequest("The request body is not valid JSON.") from None

