"""Idempotent stages are retried when their replica is gone (Ray's real exception classes),
within the deadline, and nothing else is retried. Time is a fake clock."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayTaskError

from deployments.retry import retrying
from handlers.errors import ImageNotFound


class Clock:
    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def failing(*errors: BaseException, answer: Any = "ok") -> tuple[Callable[[], Awaitable[Any]],
                                                                  list[int]]:
    """A call that raises `errors` in turn, then answers; and how often it was called."""
    calls = [0]
    pending = list(errors)

    async def call() -> Any:
        calls[0] += 1
        if pending:
            raise pending.pop(0)
        return answer

    return call, calls


def remote(cause: BaseException) -> BaseException:
    return RayTaskError("ImageFetcher.fetch", "Traceback ...", cause).as_instanceof_cause()


async def test_a_dead_or_unreachable_replica_is_retried_until_the_call_answers() -> None:
    clock = Clock()
    call, calls = failing(ActorDiedError(), ActorUnavailableError("gone", None),
                          remote(ActorDiedError()))
    assert await retrying("fetch", call, deadline=60, clock=clock, sleep=clock.sleep) == "ok"
    assert calls == [4] and len(clock.slept) == 3


async def test_a_client_error_is_never_retried() -> None:
    clock = Clock()
    call, calls = failing(remote(ImageNotFound("gone")))
    with pytest.raises(ImageNotFound):
        await retrying("fetch", call, deadline=60, clock=clock, sleep=clock.sleep)
    assert calls == [1] and clock.slept == []


async def test_retries_stop_before_the_deadline() -> None:
    clock = Clock()
    call, calls = failing(*[ActorDiedError() for _ in range(100)])
    with pytest.raises(ActorDiedError):
        await retrying("preprocess", call, deadline=3.0, clock=clock, sleep=clock.sleep)
    assert clock.now < 3.0  # no try was started past the deadline
    assert 1 < calls[0] < 100
