"""Keep a CPU vLLM engine on cores of its own.

vLLM's CPU worker binds its OpenMP threads to fixed cores and busy-polls for its next
batch. Every other process the OS lets onto those cores (Ray's raylet, the Serve
replicas) interrupts it or waits behind it. When Iris starts Ray itself, it gives the
worker the first `engine.cpu_cores` cores and starts Ray, and so every process Ray
starts, on the rest. The exception is the engine's core process (vLLM's scheduler),
which LLMServer starts on the worker's cores: the two take turns, so the scheduler runs
when the worker polls instead of competing with request handling.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from handlers.config import CpuCores, EngineSettings

OMP_BIND_ENV = "VLLM_CPU_OMP_THREADS_BIND"


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


def engine_process_cores(engine: EngineSettings, environ: dict[str, str]) -> list[int]:
    """In the engine replica: the cores init_ray gave the worker (read back from the
    environment Ray started with), for the engine's core process to join; [] if Iris
    did not place the engine."""
    bind = environ.get(OMP_BIND_ENV, "")
    if not _iris_places(engine) or not bind:
        return []
    try:
        return sorted({int(c) for c in bind.split(",")})
    except ValueError:  # vLLM's own forms (auto, nobind, 0-3|4-7): not Iris's
        return []


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
