"""A dead engine is seen as dead at once, and nothing waits on it forever: the core process's
exit is read from the process itself (vLLM flags it from a monitor thread, a moment later),
and a restart first fails the requests still waiting on the old engine."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import pytest

from tests.fakes import EngineStandIn, SupervisedEngine


@pytest.fixture
def core() -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    yield proc
    proc.kill()
    proc.wait()


def test_a_killed_core_is_dead_before_vllm_says_so(core: subprocess.Popen[bytes]) -> None:
    from handlers.engine import InProcessEngine

    vllm = EngineStandIn([core.pid])
    engine = InProcessEngine(vllm)
    assert not engine.errored
    core.kill()
    # Exited, not reaped: a zombie, as a killed EngineCore is until vLLM waits on it.
    os.waitid(os.P_PID, core.pid, os.WEXITED | os.WNOWAIT)
    assert engine.errored
    core.wait()
    assert engine.errored
    assert not vllm.errored  # seen from the process, not from vLLM's flag


def test_failing_in_flight_requests_marks_the_engine_dead(core: subprocess.Popen[bytes]
                                                          ) -> None:
    from vllm.v1.engine.exceptions import EngineDeadError

    from handlers.engine import InProcessEngine

    vllm = EngineStandIn([core.pid])
    engine = InProcessEngine(vllm)
    engine.fail_in_flight()
    assert [type(e) for e in vllm.propagated] == [EngineDeadError]
    assert engine.errored  # its requests' errors answer 503, not 500


def test_a_restart_fails_what_waits_on_the_old_engine_before_shutting_it_down() -> None:
    from deployments.supervisor import Supervisor
    from handlers.errors import EngineUnavailable

    old, new = SupervisedEngine(), SupervisedEngine()

    async def run() -> None:
        started = asyncio.Event()

        async def start() -> SupervisedEngine:
            started.set()
            return new

        sup = Supervisor(old, start, stall_timeout_s=60, restart_attempts=3)
        sup.watch()
        old.errored = True
        with pytest.raises(EngineUnavailable):
            sup.serving()
        await started.wait()  # the watchdog's next tick restarts it
        assert sup.serving() is new
        await sup.shutdown()

    asyncio.run(run())
    assert old.calls == ["fail_in_flight", "shutdown"]
