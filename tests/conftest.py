"""Session-wide real services: moto S3, a loopback image server, and the Iris app.

The Serve app (and its vLLM engine) starts once per test session."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.servers import ImageServer, S3Server, free_port

ROOT = Path(__file__).resolve().parent.parent
MODEL_DIR = ROOT / ".models" / "demo-vlm"
# vLLM on CPU: a small, fixed KV cache so several engines fit in this machine's RAM.
ENGINE_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}
API_KEYS = ["iris-test-key", "iris-second-key"]
# Small engine queue so the backpressure test can overflow it quickly.
LLM_MAX_ONGOING = 4
LLM_MAX_QUEUED = 4
MAX_BODY_BYTES = 8 << 20


@pytest.fixture(scope="session")
def s3() -> Iterator[S3Server]:
    server = S3Server()
    yield server
    server.close()


@pytest.fixture(scope="session")
def image_server() -> Iterator[ImageServer]:
    server = ImageServer()
    yield server
    server.close()


@pytest.fixture(scope="session")
def iris_config():  # type: ignore[no-untyped-def]
    from handlers.config import load_config

    if not (MODEL_DIR / "config.json").exists():
        pytest.exit("demo model missing: run `make demo-model` (make test does it)", 2)
    cfg = load_config(
        # direct_ingress comes from infra/local.yaml: ChatIngress listens on port itself.
        http={"host": "127.0.0.1", "port": free_port(), "proxy_port": free_port()},
        app_name="iris-test",
        api_key=API_KEYS,
        limits={"max_body_bytes": MAX_BODY_BYTES},
    )
    llm = cfg.deployments.llm.model_copy(
        update={"max_ongoing_requests": LLM_MAX_ONGOING, "max_queued_requests": LLM_MAX_QUEUED}
    )
    return cfg.model_copy(
        update={"deployments": cfg.deployments.model_copy(update={"llm": llm})}
    )


@pytest.fixture(scope="session")
def iris(iris_config, s3: S3Server) -> Iterator[str]:  # type: ignore[no-untyped-def]
    """Base URL (…/v1) of the real Iris app on a local Ray instance."""
    import ray
    from ray import serve

    from deployments.run import init_ray, start

    env = {**s3.env, "PYTHONPATH": str(ROOT)}
    # Replicas read AWS settings from their environment, as in production.
    os.environ.update(s3.env)
    metrics_port = free_port()
    os.environ["IRIS_TEST_METRICS_PORT"] = str(metrics_port)
    init_ray(iris_config, num_cpus=8, runtime_env={"env_vars": env}, log_to_driver=False,
             _metrics_export_port=metrics_port)
    t0 = time.monotonic()
    start(iris_config)
    print(f"\n[iris] app ready in {time.monotonic() - t0:.0f} s", file=sys.stderr)
    yield f"http://{iris_config.http.host}:{iris_config.http.port}/v1"
    serve.shutdown()
    ray.shutdown()
