"""ChatIngress: the only HTTP surface. Parse -> prepare the images -> the chat backend ->
JSON or a relayed stream; every error in one envelope.

Helpers live above the deployment class: Serve ships the ingress class by value, and
module globals defined after it are not there in the replica."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from deployments.asgi import CancelledReceiveIsDisconnect
from deployments.backend import start_backend
from deployments.contract import EngineRequest, PreparedImage
from deployments.encoder_client import EncoderClient, start_encoder_backend
from deployments.images import ImagePreparer
from deployments.metrics import metrics, record_error
from deployments.ray_errors import client_error
from handlers import json_body
from handlers.auth import BearerAuth
from handlers.capped import CappedBuffer
from handlers.config import IrisConfig
from handlers.cpu_affinity import to_replica_cores
from handlers.errors import (
    InternalError,
    InvalidRequest,
    IrisError,
    ModelNotFound,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    RequestTimeout,
)
from handlers.events import EngineEvent, EventStream, JsonAnswer
from handlers.protocol import ImageRef, extract_images, model_card, model_list, parse_envelope
from handlers.responses import chat_body as responses_chat_body
from handlers.responses import new_response_id, response_from_chat, responses_param
from handlers.responses import parse_request as parse_responses
from handlers.responses_stream import ResponsesStream, sse_frames
from handlers.sse import SSE_HEADERS, relay

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


async def read_json(request: Request, limit: int) -> Any:
    """The body, parsed, read no further than `limit` bytes."""
    body = CappedBuffer(limit, lambda: PayloadTooLarge(
        f"The request body is larger than {limit} bytes."))
    body.check_declared(request.headers.get("content-length"))
    async for chunk in request.stream():
        body.add(chunk)
    try:
        return json_body.loads(body.getvalue())
    except (ValueError, UnicodeDecodeError):
        raise InvalidRequest("The request body is not valid JSON.") from None


def request_id() -> str:
    """Serve's request id (the client's x-request-id, or one Serve generated)."""
    try:
        from ray.serve.context import _get_serve_request_context

        return _get_serve_request_context().request_id or uuid.uuid4().hex
    except Exception:
        return uuid.uuid4().hex


def affinity_key(body: dict[str, Any], images: list[PreparedImage]) -> str | None:
    """What routes requests that share a prefix to one engine replica: the client's
    prompt_cache_key, else the conversation's first image (ImageAffinityRouter)."""
    key = body.get("prompt_cache_key")
    if isinstance(key, str) and key:
        return f"key:{key}"
    return f"image:{images[0].uuid}" if images else None


@serve.deployment(name="ChatIngress")
@serve.ingress(app)
class ChatIngress:
    async def __init__(  # type: ignore[misc]  # Serve awaits an async __init__
        self, config: IrisConfig, preprocessor: DeploymentHandle,
        llm: DeploymentHandle | None, encoder: DeploymentHandle | None = None,
    ) -> None:
        to_replica_cores()
        self._cfg = config
        self._model_id = config.model.id if config.serve_chat else None
        self._images = ImagePreparer(preprocessor, config)
        # The engine in this replica, or LLMServer's handle: the rest of the class does not
        # know which (deployments/backend.py).
        self._backend = await start_backend(config, llm)
        # /v1/embeddings and /v1/moderations, when an encoder is served: EmbeddingServer's
        # handle, or (deployments.encoder_in_ingress) an encoder engine in this replica,
        # started after the chat engine (both starts set this process's placement).
        self._encoder_backend = await start_encoder_backend(config, encoder)
        self._encoder = (EncoderClient(config, self._encoder_backend, self._images)
                         if self._encoder_backend is not None else None)
        self._created = int(time.time())
        app.state.api_keys = (
            [k.get_secret_value().encode() for k in config.api_key] if config.api_key else None
        )

    async def check_health(self) -> None:
        """Serve's health check: this replica is replaced when the engine it holds (if any)
        cannot be brought back."""
        await self._backend.check_health()
        if self._encoder_backend is not None:
            await self._encoder_backend.check_health()

    async def __del__(self) -> None:
        await self._backend.shutdown()
        if self._encoder_backend is not None:
            await self._encoder_backend.shutdown()

    @app.get("/health")
    async def health(self) -> dict[str, str]:
        """Liveness: this replica answers."""
        return {"status": "ok"}

    @app.get("/ready")
    async def ready(self) -> JSONResponse:
        """Readiness: the chat engine can serve; in an app that serves only the encoder, the
        encoder can. (Beside a chat model, an encoder that is down does not make the replica
        unready: it would take chat offline with it.)"""
        try:
            await asyncio.wait_for(self._backend.ready(), 10)
            if self._model_id is None and self._encoder is not None:
                await asyncio.wait_for(self._encoder.ready(), 10)
        except Exception:
            err = Overloaded("The engine is not ready.", code="not_ready",
                             headers={"Retry-After": "5"})
            return JSONResponse(err.envelope(), status_code=503, headers=err.headers)
        return JSONResponse({"status": "ready"})

    async def record_routing_stats(self) -> dict[str, Any]:
        """The engine's load and counters, when it runs here (Serve polls this; tests and
        benchmarks read it from the replica)."""
        here = self._encoder_backend.stats() if self._encoder_backend else {}
        encoder = {"encoder": here} if here else {}
        return {**await self._backend.stats(), "recent_images": self._images.stats(), **encoder}

    def _served(self) -> list[str]:
        return [m for m in (self._model_id, self._encoder and self._encoder.model_id) if m]

    @app.get("/v1/models")
    async def models(self) -> dict[str, Any]:
        return model_list(self._served(), self._created)

    @app.get("/v1/models/{model_id:path}")
    async def model(self, model_id: str) -> dict[str, Any]:
        if model_id not in self._served():
            raise ModelNotFound(f"The model {model_id!r} does not exist.", param="model")
        return model_card(model_id, model_id, self._created)

    @app.post("/v1/embeddings")
    async def embeddings(self, request: Request) -> Response:
        """OpenAI's embeddings, with images as input items, from the encoder."""
        return await self._within_deadline(self._encode(request, "embeddings"))

    @app.post("/v1/moderations")
    async def moderations(self, request: Request) -> Response:
        """OpenAI's omni-moderation, text and images, scored with the encoder."""
        return await self._within_deadline(self._encode(request, "moderations"))

    async def _encode(self, request: Request, route: str) -> Response:
        deadline = time.monotonic() + self._cfg.limits.request_timeout_s
        body = await read_json(request, self._cfg.limits.max_body_bytes)
        if self._encoder is None:
            model = body.get("model") if isinstance(body, dict) else None
            raise ModelNotFound(f"The model {model!r} does not exist: this server has no "
                                f"encoder for /v1/{route}.", param="model")
        work = (self._encoder.embeddings if route == "embeddings"
                else self._encoder.moderations)
        return JSONResponse(await work(body, deadline))

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        return await self._within_deadline(self._chat(request))

    @app.post("/v1/responses")
    async def responses(self, request: Request) -> Response:
        """OpenAI's Responses API, stateless, translated onto the chat path."""
        return await self._within_deadline(self._responses(request))

    async def _within_deadline(self, work: Any) -> Response:
        """The request's whole life up to its first byte, bounded by limits.request_timeout_s;
        every exception mapped to the envelope here (Serve would answer some itself)."""
        try:
            async with asyncio.timeout(self._cfg.limits.request_timeout_s):
                response: Response = await work
                return response
        except TimeoutError:
            raise RequestTimeout.past_deadline() from None
        except Exception as exc:
            raise client_error(exc) from None

    async def _responses(self, request: Request) -> Response:
        started = time.perf_counter()
        deadline = time.monotonic() + self._cfg.limits.request_timeout_s
        req = parse_responses(await read_json(request, self._cfg.limits.max_body_bytes))
        if self._model_id is None or req.model != self._model_id:
            raise ModelNotFound(f"The model {req.model!r} does not exist.", param="model")
        body = responses_chat_body(req)
        try:
            body["messages"], refs = extract_images(
                body["messages"], self._cfg.limits.max_images_per_request)
            first, stream = await self.open_chat(body, refs, deadline, started)
        except IrisError as err:
            err.param = responses_param(req, err.param)  # the Responses field, not chat's
            raise
        response_id, created = new_response_id(), int(time.time())
        if isinstance(first, JsonAnswer):
            await stream.aclose()
            return JSONResponse(response_from_chat(first.body, req, response_id, created))
        events = ResponsesStream(req, response_id, created)

        async def translated() -> AsyncIterator[str]:
            yield sse_frames(events.start())
            async for text in relay(first.text, stream, deadline, on_error=record_error,
                                    on_done=lambda: None):
                yield sse_frames(events.feed_sse(text))  # error frames become failed events
            yield sse_frames(events.finish())

        return StreamingResponse(translated(), media_type="text/event-stream",
                                 headers=SSE_HEADERS)

    async def _chat(self, request: Request) -> Response:
        started = time.perf_counter()
        deadline = time.monotonic() + self._cfg.limits.request_timeout_s
        body = await read_json(request, self._cfg.limits.max_body_bytes)
        env = parse_envelope(body)
        if self._model_id is None or env.model != self._model_id:
            raise ModelNotFound(f"The model {env.model!r} does not exist.", param="model")
        body["messages"], refs = extract_images(
            env.messages, self._cfg.limits.max_images_per_request)
        metrics().images_per_request.observe(len(refs))
        first, stream = await self.open_chat(body, refs, deadline, started)
        if isinstance(first, JsonAnswer):
            await stream.aclose()
            metrics().stage("e2e", time.perf_counter() - started, stream="false")
            return JSONResponse(first.body)
        metrics().stage("ttft", time.perf_counter() - started, stream="true")
        return StreamingResponse(
            relay(first.text, stream, deadline, on_error=record_error,
                  on_done=lambda: metrics().stage("e2e", time.perf_counter() - started,
                                                  stream="true")),
            media_type="text/event-stream", headers=SSE_HEADERS,
        )

    async def open_chat(
        self, body: dict[str, Any], refs: list[ImageRef], deadline: float, started: float
    ) -> tuple[EngineEvent, EventStream]:
        """Prepare the images, send the request to the engine, and wait for its first
        event."""
        body["request_id"] = f"{request_id()}-{uuid.uuid4().hex[:8]}"  # unique per engine
        images = await self._images.prepare_all(refs, deadline)
        if refs:
            metrics().stage("images", time.perf_counter() - started)
        sent = time.perf_counter()
        stream = self._backend.chat(EngineRequest(body, images, affinity_key(body, images)))
        try:
            first = await anext(stream)
        except StopAsyncIteration:
            raise InternalError("The engine returned nothing.") from None
        except BaseException:
            await stream.aclose()
            raise
        metrics().stage("queue", time.perf_counter() - sent)
        return first, stream
