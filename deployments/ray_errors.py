"""Ray's exceptions, matched by their real classes, mapped onto Iris's errors.

handlers/ never imports Ray; every place that catches what a Ray call raised maps it here."""

from __future__ import annotations

from ray.exceptions import (
    GetTimeoutError,
    NodeDiedError,
    RayActorError,
    RayTaskError,
    WorkerCrashedError,
)
from ray.serve.exceptions import BackPressureError, ReplicaUnavailableError

from handlers.errors import IrisError, Overloaded, RequestTimeout, StageUnavailable, to_error

# The replica (or its node) went away under the call: ActorDiedError, ActorUnavailableError
# (both RayActorError), a crashed worker, a dead node, a replica Serve already dropped.
REPLICA_GONE: tuple[type[BaseException], ...] = (
    RayActorError, WorkerCrashedError, NodeDiedError, ReplicaUnavailableError,
)


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


def replica_gone(exc: BaseException) -> bool:
    return isinstance(unwrap(exc), REPLICA_GONE)


def client_error(exc: BaseException) -> IrisError:
    """Any exception, from this process or a remote call, as an error a client may see."""
    inner = unwrap(exc)
    if isinstance(inner, BackPressureError):
        return Overloaded.at_capacity()
    if isinstance(inner, GetTimeoutError):
        return RequestTimeout.past_deadline()
    if isinstance(inner, REPLICA_GONE):  # what is left once the retries gave up
        return StageUnavailable.replica_gone()
    return to_error(inner)
