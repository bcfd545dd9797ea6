"""One typed error hierarchy and the one mapping to OpenAI's error envelope."""

from __future__ import annotations

import logging
import re
from typing import Any

# A child of Serve's logger: in a replica, its lines go to the replica log with the request id.
logger = logging.getLogger("ray.serve.iris.errors")


class IrisError(Exception):
    """Base of every error a client may see. Carries HTTP status and OpenAI fields."""

    status: int = 500
    type: str = "internal_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        status: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        self.headers = headers or {}

    def __reduce__(self) -> tuple[Any, ...]:
        # Keep status/param/code when the error crosses a Ray deployment handle.
        return (
            _rebuild,
            (type(self), self.message, self.param, self.code, self.status, self.headers),
        )

    def with_param(self, param: str) -> IrisError:
        """Point the error at a request field, prefixing any inner param."""
        self.param = f"{param}.{self.param}" if self.param else param
        return self

    def envelope(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def _rebuild(
    cls: type[IrisError],
    message: str,
    param: str | None,
    code: str | None,
    status: int,
    headers: dict[str, str],
) -> IrisError:
    return cls(message, param=param, code=code, status=status, headers=headers)


class InvalidRequest(IrisError):
    status = 400
    type = "invalid_request_error"


class ImageError(InvalidRequest):
    """The image itself, or fetching it, is the client's problem."""

    code = "invalid_image"


class ImageTooLarge(ImageError):
    code = "image_too_large"

    @classmethod
    def over_cap(cls, cap: int) -> ImageTooLarge:
        return cls(f"The image is larger than the {cap}-byte limit.")


class ImageNotFound(ImageError):
    code = "image_not_found"


class FetchForbidden(ImageError):
    code = "image_url_forbidden"


class FetchTimeout(ImageError):
    code = "image_fetch_timeout"


class ImageUnreachable(ImageError):
    """The image's host could not be resolved or connected to: the URL's fault."""

    code = "image_unreachable"


class UpstreamUnavailable(IrisError):
    """An image source failed on its side (5xx, throttling) after retries."""

    status = 502
    type = "upstream_error"
    code = "image_source_unavailable"


class AuthenticationFailed(IrisError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class NotFound(IrisError):
    status = 404
    type = "not_found_error"
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class PayloadTooLarge(IrisError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class Overloaded(IrisError):
    status = 503
    type = "overloaded_error"
    code = "server_overloaded"

    @classmethod
    def at_capacity(cls) -> Overloaded:
        """A queue in front of the engine is full (Serve's, or the in-process one)."""
        return cls("The server is at capacity; retry shortly.", headers={"Retry-After": "1"})


class EngineUnavailable(IrisError):
    """The engine is down (dead, or restarting): the request was not served; retry."""

    status = 503
    type = "server_error"
    code = "engine_unavailable"
    RETRY_AFTER_S = 10

    @classmethod
    def restarting(cls) -> EngineUnavailable:
        return cls("The model engine is restarting; retry shortly.",
                   headers={"Retry-After": str(cls.RETRY_AFTER_S)})

    @classmethod
    def lost_mid_answer(cls) -> EngineUnavailable:
        """The replica holding the engine went away after the answer had begun (a stream
        cannot be resumed elsewhere)."""
        return cls("The model engine serving this answer went away; retry the request.",
                   headers={"Retry-After": str(cls.RETRY_AFTER_S)})


class StageUnavailable(IrisError):
    """A replica serving part of the request (fetcher, preprocessor) went away, and the
    retries on others ran out of time: nothing is wrong with the request; retry."""

    status = 503
    type = "server_error"
    code = "service_unavailable"

    @classmethod
    def replica_gone(cls) -> StageUnavailable:
        return cls("A server replica serving this request went away; retry shortly.",
                   headers={"Retry-After": "5"})


class RequestTimeout(IrisError):
    status = 504
    type = "timeout_error"
    code = "request_timeout"

    @classmethod
    def past_deadline(cls) -> RequestTimeout:
        return cls("The request took longer than the server allows.")


class InternalError(IrisError):
    status = 500
    type = "internal_error"
    code = "internal_error"


GENERIC_500 = "The server had an error while processing your request."

# Anything that looks like internals must never reach a client: memory addresses (not the
# "0x4000" inside "40000x40000"), tracebacks, source paths, line numbers.
_LEAK = re.compile(
    r"((?<![0-9A-Za-z])0x[0-9a-fA-F]{4,}|Traceback|File \"|/[\w.-]+/[\w./-]+\.py|\bline \d+\b)"
)


def _unwrap(exc: BaseException) -> BaseException:
    """The IrisError this exception was raised from (`raise ... from err`), if any."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, IrisError):
            return cur
        cur = cur.__cause__
    return exc


def to_error(exc: BaseException) -> IrisError:
    """Map any exception to an IrisError a client may see. (Ray's exceptions are mapped in
    deployments/ray_errors.py, which knows their classes.)"""
    inner = _unwrap(exc)
    if isinstance(inner, IrisError):
        if inner.status >= 500 and inner.type == "internal_error":
            return InternalError(GENERIC_500)
        if _LEAK.search(inner.message):
            logger.warning("scrubbed a leaky error message: %s", inner.message)
            inner.message = _LEAK.sub("[...]", inner.message)
        return inner
    if isinstance(inner, TimeoutError):
        return RequestTimeout.past_deadline()
    logger.error("unexpected error", exc_info=(type(exc), exc, exc.__traceback__))
    return InternalError(GENERIC_500)


def error_from_openai_payload(status: int, payload: dict[str, Any]) -> IrisError:
    """Rebuild an IrisError from an OpenAI-style error dict (e.g. vLLM's ErrorResponse)."""
    err = payload.get("error", payload)
    message = str(err.get("message") or "")
    param = err.get("param")
    if status >= 500:
        return InternalError(GENERIC_500)
    cls: type[IrisError] = {
        401: AuthenticationFailed,
        404: NotFound,
        413: PayloadTooLarge,
        503: Overloaded,
    }.get(status, InvalidRequest)
    out = cls(message or "Invalid request.", param=param, status=status)
    if err.get("code") and isinstance(err.get("code"), str):
        out.code = err["code"]
    return to_error(out)
