"""Ray's exceptions, matched by their real classes, mapped onto Iris's errors.

handlers/ never imports Ray; every place that catches what a Ray call raised maps it here."""

from __future__ import annotations

from ray.exceptions import GetTimeoutError, RayTaskError
from ray.serve.exceptions import BackPressureError

from handlers.errors import IrisError, Overloaded, RequestTimeout, to_error


def unwrap(exc: BaseException) -> BaseException:
    """The exception a remote call raised, out of Ray's task-error wrappers. (Ray's wrapper
    also subclasses the cause's class, so it must be unwrapped before anything else looks
    at it: rebuilding it by its own type fails.)"""
    seen: set[int] = set()
    while isinstance(exc, RayTaskError) and id(exc) not in seen:
        seen.add(id(exc))
        cause = exc.cause
        if not isinstance(cause, BaseException):
            break
        exc = cause
    return exc


def client_error(exc: BaseException) -> IrisError:
    """Any exception, from this process or a remote call, as an error a client may see."""
    inner = unwrap(exc)
    if isinstance(inner, BackPressureError):
        return Overloaded.at_capacity()
    if isinstance(inner, GetTimeoutError):
        return RequestTimeout.past_deadline()
    return to_error(inner)
