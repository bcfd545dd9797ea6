"""ChatIngress: the only HTTP surface. Parse -> delegate -> map errors."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from deployments.preprocessor import PreparedImage
from handlers.config import IrisConfig
from handlers.errors import (
    InvalidRequest,
    IrisError,
    ModelNotFound,
    NotFound,
    PayloadTooLarge,
    to_error,
)
from handlers.protocol import (
    ImageRef,
    extract_images,
    model_card,
    model_list,
    parse_envelope,
    strip_image_urls,
)

logger = logging.getLogger("ray.serve")

app = FastAPI(title="Iris", docs_url=None, redoc_url=None)


def error_response(exc: BaseException) -> JSONResponse:
    err = to_error(exc)
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


def sse_error(exc: BaseException) -> str:
    return f"data: {json.dumps(to_error(exc).envelope())}\n\ndata: [DONE]\n\n"


@serve.deployment(name="ChatIngress")
@serve.ingress(app)
class ChatIngress:
    def __init__(
        self, config: IrisConfig, preprocessor: DeploymentHandle, llm: DeploymentHandle
    ) -> None:
        self._cfg = config
        self._model_id = config.model.id
        self._prep = preprocessor
        self._llm = llm
        self._created = int(__import__("time").time())

    @app.get("/health")
    async def health(self) -> dict[str, str]:
        return {"status": "ok"}

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
        body = await self._read_json(request)
        env = parse_envelope(body)
        if env.model != self._model_id:
            raise ModelNotFound(f"The model {env.model!r} does not exist.", param="model")
        refs = extract_images(env.messages, self._cfg.limits.max_images_per_request)
        images = await asyncio.gather(*(self._prepare(r) for r in refs))
        body["messages"] = strip_image_urls(env.messages, refs)

        gen = self._llm.options(stream=True).chat.remote(body, list(images))
        try:
            kind, payload = await gen.__anext__()
        except StopAsyncIteration:
            raise IrisError("The engine returned nothing.") from None
        except Exception as exc:
            gen.cancel()
            raise to_error(exc) from None
        if kind == "json":
            return JSONResponse(payload)
        if kind == "error":
            gen.cancel()
            raise payload
        return StreamingResponse(
            _stream(payload, gen),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def _prepare(self, ref: ImageRef) -> PreparedImage:
        try:
            return await self._prep.prepare.remote(ref.url, ref.detail)
        except Exception as exc:
            err = to_error(exc)
            if isinstance(err, IrisError) and err.status < 500 and not err.param:
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
            return json.loads(b"".join(chunks))
        except (ValueError, UnicodeDecodeError):
            raise InvalidRequest("The request body is not valid JSON.") from None


async def _stream(first: str, gen: Any) -> AsyncIterator[str]:
    """Relay SSE chunks; an error after the first byte becomes an SSE error event."""
    try:
        yield first
        async for kind, payload in gen:
            if kind == "error":
                yield sse_error(payload)
                return
            yield payload
    except asyncio.CancelledError:
        gen.cancel()  # client went away: stop the engine request too
        raise
    except Exception as exc:
        yield sse_error(exc)
