"""engine.cpu_cores (infra/local.yaml: auto): the CPU engine's worker has cores of its own;
Ray and the replicas keep to the rest."""

from __future__ import annotations

import os
from typing import Any

import psutil
import pytest

from handlers.cpu_affinity import engine_core_split


def _replica(app: str, deployment: str) -> psutil.Process:
    for p in psutil.process_iter(["cmdline"]):
        if f"ServeReplica:{app}:{deployment}" in " ".join(p.info["cmdline"] or []):
            return p
    raise AssertionError(f"no {deployment} replica process")


def test_engine_worker_and_replicas_on_separate_cores(iris: str, iris_config: Any) -> None:
    split = engine_core_split(iris_config.engine)
    if split is None:
        pytest.skip("one core: nothing to keep apart")
    engine_cores, others = split
    llm = _replica(iris_config.app_name, "LLMServer")
    workers = [c for c in llm.children(recursive=True) if "VLLM::Worker" in c.name()]
    assert workers, "no vLLM worker under LLMServer"
    for w in workers:
        assert w.cpu_affinity() == engine_cores
    for name in ("ChatIngress", "ImagePreprocessor", "ImageFetcher", "LLMServer"):
        assert _replica(iris_config.app_name, name).cpu_affinity() == others, name
    # The test process itself was put back: it is not part of the Ray instance.
    assert sorted(os.sched_getaffinity(0)) == engine_cores + others
