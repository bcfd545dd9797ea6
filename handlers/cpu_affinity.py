"""Keep a CPU vLLM engine's scheduler on cores of its own.

vLLM's CPU worker binds its OpenMP threads to fixed cores and busy-polls for its next
batch; its engine core process (the scheduler) busy-polls for the worker's answers. When
Iris starts Ray itself, it keeps the first `engine.cpu_cores` cores for the engine and
starts Ray, and so every process Ray starts, on the rest. The engine replica starts the
scheduler on the engine's cores, where it takes turns with the worker's thread there
(both poll with sched_yield, which hands the core to the other) instead of competing with
request handling. With `engine.cpu_worker_threads: all` the worker also gets one thread
on each of the replicas' cores: the forward pass then takes the time request handling
leaves idle there (compare-26/27: conversations 1.12-1.35x), but waits for its threads
there whenever request handling is busy (compare-28/29: 12 MP images 0.74-0.88x). Since
the replicas spend less CPU per image (one preprocessor call), it is even on never-seen
images and 1.5x on conversations (compare-34), so infra/local.yaml turns it on.
With `engine.ray_cores: engine` Ray's own processes (GCS, raylet, agents, Serve's controller
and proxy) start on the engine's cores instead, where the worker and the scheduler yield
to them while they poll, and each replica moves itself to the replicas' cores when it
starts (to_replica_cores): 12 MP images 1.11x, c=1 first token 18 ms sooner (compare-52).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping

from handlers.config import CpuCores, EngineSettings

OMP_BIND_ENV = "VLLM_CPU_OMP_THREADS_BIND"
# Set by init_ray when Ray's own processes start on the engine's cores
# (engine.ray_cores: engine): the cores every replica moves itself to.
REPLICA_CORES_ENV = "IRIS_REPLICA_CORES"


def available_cores() -> list[int]:
    if not hasattr(os, "sched_getaffinity"):
        return []
    return sorted(os.sched_getaffinity(0))


def split_cores(cores: list[int], engine: CpuCores) -> tuple[list[int], list[int]] | None:
    """(the engine worker's cores, everyone else's), or None when there is nothing to split."""
    if engine == "off" or len(cores) < 2:
        return None
    n = len(cores) // 2 if engine == "auto" else engine
    n = max(1, min(n, len(cores) - 1))
    return cores[:n], cores[n:]


def _iris_places(engine: EngineSettings) -> bool:
    """engine.cpu_cores is on, the engine has one shard, and the user did not place its
    worker (VLLM_CPU_OMP_THREADS_BIND in engine.env)."""
    return (engine.cpu_cores != "off"
            and engine.tensor_parallel_size * engine.pipeline_parallel_size == 1
            and OMP_BIND_ENV not in engine.env)


def engine_core_split(engine: EngineSettings) -> tuple[list[int], list[int]] | None:
    """engine.cpu_cores on this machine, when Iris places the engine at all."""
    if not _iris_places(engine):
        return None
    return split_cores(available_cores(), engine.cpu_cores)


def omp_bind(cores: list[int]) -> str:
    """VLLM_CPU_OMP_THREADS_BIND's format: '0,1,2'."""
    return ",".join(str(c) for c in cores)


def ray_start_cores(engine: EngineSettings,
                    split: tuple[list[int], list[int]] | None) -> tuple[list[int], list[int]]:
    """(the cores Ray's processes start on, the cores replicas move to; [] for where they
    start) for engine_core_split's `split`."""
    if split is None:
        return [], []
    if engine.ray_cores == "engine":
        return split[0], split[1]
    return split[1], []


def parse_cores(text: str) -> list[int]:
    """omp_bind's format back to cores; [] for anything else (vLLM's own forms: auto,
    nobind, 0-3|4-7)."""
    try:
        return sorted({int(c) for c in text.split(",")}) if text else []
    except ValueError:
        return []


def replica_cores(environ: Mapping[str, str]) -> list[int]:
    """In a replica: the cores init_ray meant replicas to run on, [] where it did not say."""
    return parse_cores(environ.get(REPLICA_CORES_ENV, ""))


def to_replica_cores() -> None:
    """Called first in every replica: off the cores Ray's processes started it on, onto the
    replicas' (engine.ray_cores: engine); nothing otherwise."""
    move_to(replica_cores(os.environ))


def engine_process_cores(engine: EngineSettings, environ: dict[str, str]) -> list[int]:
    """In the engine replica: the cores init_ray gave the worker (read back from the
    environment Ray started with), for the engine's core process to join; [] if Iris
    did not place the engine."""
    return parse_cores(environ.get(OMP_BIND_ENV, "")) if _iris_places(engine) else []


def worker_threads(engine: EngineSettings, engine_cores: list[int]) -> list[int]:
    """The cores for the CPU worker's OpenMP threads (one thread each), the engine's first:
    its own, and with cpu_worker_threads all also this process's (an engine replica, on
    Ray's cores). [] when Iris did not place the engine."""
    if not engine_cores or engine.cpu_worker_threads == "engine":
        return engine_cores
    return engine_cores + [c for c in available_cores() if c not in engine_cores]


@contextlib.contextmanager
def worker_bind(cores: list[int]) -> Iterator[None]:
    """VLLM_CPU_OMP_THREADS_BIND set to `cores` for the block (what the engine's processes
    read when they start), put back afterwards: the replica's own value still names the
    engine's cores when the engine is started again."""
    if not cores:
        yield
        return
    before = os.environ.get(OMP_BIND_ENV)
    os.environ[OMP_BIND_ENV] = omp_bind(cores)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(OMP_BIND_ENV, None)
        else:
            os.environ[OMP_BIND_ENV] = before


def _set_all_threads(cores: set[int]) -> None:
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(OSError):  # a thread may end meanwhile
            os.sched_setaffinity(int(tid), cores)


@contextlib.contextmanager
def pinned(cores: list[int]) -> Iterator[None]:
    """This process on `cores` for the block: what it starts inside inherits them."""
    if not cores or not hasattr(os, "sched_setaffinity"):
        yield
        return
    before = os.sched_getaffinity(0)
    _set_all_threads(set(cores))
    try:
        yield
    finally:
        _set_all_threads(before)


def move_to(cores: list[int]) -> None:
    """This process, every thread it has and will start, on `cores` from now on (nothing
    when `cores` is empty)."""
    if cores and hasattr(os, "sched_setaffinity"):
        _set_all_threads(set(cores))
