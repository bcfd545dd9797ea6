from __future__ import annotations

import os
import subprocess
import sys

import pytest

from handlers import cpu_affinity
from handlers.config import EngineSettings
from handlers.cpu_affinity import (
    OMP_BIND_ENV,
    REPLICA_CORES_ENV,
    engine_core_split,
    engine_process_cores,
    omp_bind,
    pinned,
    ray_start_cores,
    replica_cores,
    split_cores,
    worker_threads,
)


def test_split_cores() -> None:
    assert split_cores([0, 1], "off") is None
    assert split_cores([0], "auto") is None  # one core: nothing to keep apart
    assert split_cores([0, 1], "auto") == ([0], [1])
    assert split_cores([0, 1, 2, 3, 4, 5, 6, 7], "auto") == ([0, 1, 2, 3], [4, 5, 6, 7])
    assert split_cores([2, 3, 5], 2) == ([2, 3], [5])
    # Everyone else always keeps at least one core.
    assert split_cores([0, 1, 2], 8) == ([0, 1], [2])
    assert omp_bind([0, 1, 3]) == "0,1,3"


def test_engine_core_split_leaves_sharded_or_placed_engines_alone() -> None:
    assert engine_core_split(EngineSettings(cpu_cores=1, tensor_parallel_size=2)) is None
    assert engine_core_split(EngineSettings(cpu_cores=1, env={OMP_BIND_ENV: "0-3"})) is None
    assert engine_core_split(EngineSettings()) is None  # off by default


def test_engine_process_joins_the_cores_init_ray_gave_the_worker() -> None:
    placed = EngineSettings(cpu_cores="auto")
    assert engine_process_cores(placed, {OMP_BIND_ENV: omp_bind([0, 2])}) == [0, 2]
    # Iris did not place the engine: off, the user's own binding, or vLLM's forms.
    assert engine_process_cores(EngineSettings(), {OMP_BIND_ENV: "0"}) == []
    assert engine_process_cores(placed, {}) == []
    mine = EngineSettings(cpu_cores="auto", env={OMP_BIND_ENV: "0"})
    assert engine_process_cores(mine, {OMP_BIND_ENV: "0"}) == []
    for vllm_form in ("auto", "nobind", "0-3", "0-3|4-7"):
        assert engine_process_cores(placed, {OMP_BIND_ENV: vllm_form}) == []


def test_the_worker_threads_run_beside_the_replicas_unless_told_not_to(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_affinity, "available_cores", lambda: [1, 2, 3])  # the replica's
    placed = EngineSettings(cpu_cores="auto", cpu_worker_threads="all")
    # The engine's cores first: vLLM binds its main thread to the first.
    assert worker_threads(placed, [4, 0]) == [4, 0, 1, 2, 3]
    assert worker_threads(placed, [1]) == [1, 2, 3]
    own = EngineSettings(cpu_cores="auto")  # the default: the engine's cores only
    assert own.cpu_worker_threads == "engine" and worker_threads(own, [4, 0]) == [4, 0]
    assert worker_threads(placed, []) == []  # not placed by Iris: vLLM's own binding


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs two cores to pin to one")
@pytest.mark.parametrize("threads", ["all", "engine"])
async def test_the_engine_starts_with_its_scheduler_pinned_and_its_worker_bound(
        monkeypatch: pytest.MonkeyPatch, threads: str) -> None:
    """What the engine's processes inherit when the replica starts them (vLLM faked): the
    scheduler's affinity and the worker's thread binding; the replica's own settings are
    put back, so a restart places the engine the same way."""
    from deployments import engine_host
    from handlers.config import IrisConfig

    seen: list[tuple[str | None, list[int]]] = []

    async def fake_start(_: object) -> str:
        seen.append((os.environ.get(OMP_BIND_ENV), sorted(os.sched_getaffinity(0))))
        return "engine"

    monkeypatch.setattr(engine_host.VllmChatEngine, "start", fake_start)
    before = os.sched_getaffinity(0)
    first, *rest = sorted(before)
    monkeypatch.setenv(OMP_BIND_ENV, omp_bind([first]))  # what init_ray gave the engine
    config = IrisConfig(engine={"cpu_cores": "auto", "cpu_worker_threads": threads})
    for _ in range(2):  # the first start, and a restart
        assert await engine_host.start_engine(config) == "engine"
    bind = omp_bind([first, *rest]) if threads == "all" else omp_bind([first])
    assert seen == [(bind, [first])] * 2
    assert os.environ[OMP_BIND_ENV] == omp_bind([first]) and os.sched_getaffinity(0) == before


def test_cpu_cores_must_be_positive() -> None:
    with pytest.raises(ValueError):
        EngineSettings(cpu_cores=0)


def test_ray_starts_beside_the_replicas_or_on_the_engine_cores() -> None:
    split = ([0, 1], [2, 3])
    # replicas (the default): Ray starts on the replicas' cores, no replica needs to move.
    assert ray_start_cores(EngineSettings(cpu_cores=2), split) == ([2, 3], [])
    # engine: Ray starts on the engine's cores, replicas move to theirs.
    assert ray_start_cores(EngineSettings(cpu_cores=2, ray_cores="engine"), split) == split
    # Nothing placed: nothing pinned, nobody moves.
    assert ray_start_cores(EngineSettings(ray_cores="engine"), None) == ([], [])


def test_replica_cores_come_from_init_ray_or_are_none() -> None:
    assert replica_cores({REPLICA_CORES_ENV: "3,1"}) == [1, 3]
    assert replica_cores({}) == [] and replica_cores({REPLICA_CORES_ENV: ""}) == []
    assert replica_cores({REPLICA_CORES_ENV: "1-3"}) == []  # not init_ray's form: stay


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs two cores to pin to one")
def test_pinned_is_inherited_by_children_and_undone_after() -> None:
    before = os.sched_getaffinity(0)
    last = max(before)
    with pinned([last]):
        out = subprocess.run(
            [sys.executable, "-c", "import os; print(sorted(os.sched_getaffinity(0)))"],
            capture_output=True, text=True, check=True,
        ).stdout
    assert out.strip() == f"[{last}]"
    assert os.sched_getaffinity(0) == before


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs two cores to pin to one")
def test_move_to_moves_every_thread_and_those_started_later() -> None:
    # In a child: moving this test process would outlast the test.
    code = """
import os, threading
from handlers.cpu_affinity import move_to
ready, stop = threading.Event(), threading.Event()
seen = {}
def early():
    ready.set(); stop.wait(); seen["early"] = sorted(os.sched_getaffinity(0))
t = threading.Thread(target=early); t.start(); ready.wait()
move_to([LAST])
late = threading.Thread(target=lambda: seen.update(late=sorted(os.sched_getaffinity(0))))
late.start(); late.join(); stop.set(); t.join()
print(seen["early"], seen["late"], sorted(os.sched_getaffinity(0)))
"""
    last = max(os.sched_getaffinity(0))
    out = subprocess.run([sys.executable, "-c", code.replace("LAST", str(last))],
                         capture_output=True, text=True, check=True).stdout
    assert out.split() == [f"[{last}]"] * 3


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs two cores to pin to one")
def test_init_ray_starts_ray_beside_the_replicas_or_the_engine(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """What Ray's processes would inherit when init_ray starts them (ray.init faked)."""
    import ray

    from deployments.run import init_ray
    from handlers.config import IrisConfig

    seen: dict[str, object] = {}

    def fake_init(**_: object) -> None:
        seen["bind"] = os.environ.get(OMP_BIND_ENV)
        seen["replicas"] = os.environ.get(REPLICA_CORES_ENV)
        seen["affinity"] = sorted(os.sched_getaffinity(0))

    monkeypatch.setattr(ray, "init", fake_init)
    monkeypatch.delenv(OMP_BIND_ENV, raising=False)
    monkeypatch.delenv(REPLICA_CORES_ENV, raising=False)
    before = os.sched_getaffinity(0)
    engine, others = split_cores(sorted(before), "auto") or ([], [])
    for settings, expected in (
        # Ray, and so every replica, on the cores the engine does not have.
        ({"cpu_cores": "auto"}, {"bind": omp_bind(engine), "replicas": None,
                                 "affinity": others}),
        # Ray on the engine's cores, told where its replicas go.
        ({"cpu_cores": "auto", "ray_cores": "engine"},
         {"bind": omp_bind(engine), "replicas": omp_bind(others), "affinity": engine}),
        ({"cpu_cores": "off", "ray_cores": "engine"},
         {"bind": None, "replicas": None, "affinity": sorted(before)}),
    ):
        seen.clear()
        init_ray(IrisConfig(engine=settings))
        assert seen == expected, settings
        # Put back for this process (and whatever else it starts).
        assert os.sched_getaffinity(0) == before
        assert OMP_BIND_ENV not in os.environ and REPLICA_CORES_ENV not in os.environ


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs two cores to pin to one")
def test_a_replica_moves_to_the_cores_init_ray_named() -> None:
    """A replica started where Ray started (in a child: moving this test process would
    outlast the test)."""
    first, last = min(os.sched_getaffinity(0)), max(os.sched_getaffinity(0))
    code = ("import os; from handlers.cpu_affinity import to_replica_cores; "
            "to_replica_cores(); print(sorted(os.sched_getaffinity(0)))")
    told = {**os.environ, REPLICA_CORES_ENV: str(last)}
    untold = {k: v for k, v in os.environ.items() if k != REPLICA_CORES_ENV}
    with pinned([first]):
        moved = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                               check=True, env=told).stdout
        stayed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                check=True, env=untold).stdout
    assert (moved.strip(), stayed.strip()) == (f"[{last}]", f"[{first}]")

