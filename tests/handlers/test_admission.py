"""In-process engine admission: running slots, a bounded queue, fast refusal beyond it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from handlers.admission import Admission
from handlers.errors import Overloaded, to_error


async def settle(ready: Callable[[], bool]) -> None:
    """Let the tasks run until they are where the test needs them (event-loop turns, not
    time: each turn runs every task that can run)."""
    for _ in range(100):
        if ready():
            return
        await asyncio.sleep(0)
    raise AssertionError("the tasks never got there")


async def _hold(adm: Admission, started: list[int], release: asyncio.Event, i: int) -> None:
    async with adm.slot():
        started.append(i)
        await release.wait()


async def test_runs_up_to_the_limit_queues_the_next_and_refuses_the_rest() -> None:
    adm = Admission(running=2, waiting=1)
    started: list[int] = []
    release = asyncio.Event()
    tasks = [asyncio.ensure_future(_hold(adm, started, release, i)) for i in range(3)]
    await settle(lambda: len(started) == 2 and adm.waiting == 1)
    assert started == [0, 1]
    with pytest.raises(Overloaded) as refused:
        async with adm.slot():
            pass
    err = to_error(refused.value)
    assert err.status == 503 and err.headers == {"Retry-After": "1"}
    release.set()
    await asyncio.gather(*tasks)
    assert started == [0, 1, 2] and adm.waiting == 0


async def test_no_queue_cap_means_everyone_waits_their_turn() -> None:
    adm = Admission(running=1, waiting=-1)
    started: list[int] = []
    release = asyncio.Event()
    tasks = [asyncio.ensure_future(_hold(adm, started, release, i)) for i in range(5)]
    await settle(lambda: adm.waiting == 4)
    assert started == [0]
    release.set()
    await asyncio.gather(*tasks)
    assert sorted(started) == list(range(5))


async def test_a_cancelled_request_gives_its_slot_back() -> None:
    adm = Admission(running=1, waiting=0)
    release = asyncio.Event()
    started: list[int] = []
    first = asyncio.ensure_future(_hold(adm, started, release, 0))
    await settle(lambda: started == [0])
    first.cancel()
    await asyncio.gather(first, return_exceptions=True)
    async with adm.slot():  # would be refused if the slot had leaked
        pass
