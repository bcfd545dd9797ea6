"""Session-wide real services: moto S3, a loopback image server, and the Iris app in both of
its layouts, side by side on one Ray instance, started once per session:

- `local`: infra/local.yaml's layout, the engines inside ChatIngress, which clients reach on
  http.port through Serve's direct ingress, data: images prepared there (what `make serve`
  runs);
- `split`: the production layout, the engine in the LLMServer deployment (two replicas),
  every image through the preprocessor, reached through Serve's proxy under /split, as on a
  cluster.

Every test that takes `iris` (the base URL) or `iris_config` runs against both."""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.servers import ImageServer, S3Server, free_port
from tests.support import (
    API_KEYS,
    LLM_MAX_ONGOING,
    LLM_MAX_QUEUED,
    MAX_BODY_BYTES,
    MODEL_DIR,
    ROOT,
    IrisApp,
    write_moderation_head,
)

LAYOUTS = ("local", "split")
SPLIT_ENGINE_REPLICAS = 2


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that start their own Ray cluster go first, while the session's Ray instance (made
    on first use, kept to the end) does not exist yet: two on 2 cores starve each other."""
    items.sort(key=lambda item: item.get_closest_marker("own_ray") is None)  # stable


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


def app_configs() -> dict[str, Any]:
    from handlers.config_load import load_config

    if not (MODEL_DIR / "config.json").exists():
        pytest.exit("demo model missing: run `make demo-model` (make test does it)", 2)
    local = load_config(
        # direct_ingress comes from infra/local.yaml: ChatIngress listens on port itself.
        http={"host": "127.0.0.1", "port": free_port(), "proxy_port": free_port()},
        app_name="iris-test",
        api_key=API_KEYS,
        limits={"max_body_bytes": MAX_BODY_BYTES},
        metrics_port=free_port(),
        deployments={"llm": {"max_ongoing_requests": LLM_MAX_ONGOING,
                             "max_queued_requests": LLM_MAX_QUEUED}},
        moderation={"head": str(write_moderation_head(
            Path(tempfile.mkdtemp(prefix="iris-test-")) / "head.json"))},
    )
    d = local.deployments
    split = local.model_copy(update={
        "app_name": "iris-split",
        "encoder": None,  # one encoder engine is enough: the local app serves it
        "deployments": d.model_copy(update={
            "engine_in_ingress": False,
            # The production layout: every image through the preprocessor tier (local's
            # ingress prepares data: URIs itself, as make serve's does).
            "data_uris_in_ingress": False,
            "llm": d.llm.model_copy(update={"num_replicas": SPLIT_ENGINE_REPLICAS,
                                            "num_cpus": 0.5}),
        }),
    })
    return {"local": local, "split": split}


@pytest.fixture(scope="session")
def iris_apps(s3: S3Server) -> Iterator[dict[str, IrisApp]]:
    """Both layouts' apps on one local Ray instance, deployed side by side."""
    from ray import serve

    from deployments.app import build_app
    from deployments.run import init_ray, stop

    configs = app_configs()
    local = configs["local"]
    # Replicas read AWS settings from their environment, as in production.
    os.environ.update(s3.env)
    init_ray(local, num_cpus=8, runtime_env={"env_vars": {**s3.env, "PYTHONPATH": str(ROOT)}},
             log_to_driver=False)
    http = local.http
    serve.start(http_options={"host": http.host, "port": http.proxy_port})
    t0 = time.monotonic()
    # The local app first: its ChatIngress must take http.port (direct ingress hands ports
    # out first come, first served; the split app's ingress then takes the next one).
    for cfg, prefix in ((local, "/"), (configs["split"], "/split")):
        serve.run_many([serve.RunTarget(build_app(cfg), name=cfg.app_name, route_prefix=prefix)],
                       wait_for_applications_running=False)
        wait_running([cfg.app_name])
    print(f"\n[iris] both apps ready in {time.monotonic() - t0:.0f} s", file=sys.stderr)
    proxy = f"http://{http.host}:{http.proxy_port}"
    yield {
        "local": IrisApp("local", local, f"http://{http.host}:{http.port}/v1", f"{proxy}/v1"),
        "split": IrisApp("split", configs["split"], f"{proxy}/split/v1", f"{proxy}/split/v1"),
    }
    stop()


def wait_running(names: list[str], timeout_s: float = 900) -> None:
    from ray import serve

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        apps = serve.status().applications
        states = {n: str(apps[n].status) if n in apps else "MISSING" for n in names}
        if all(s.endswith("RUNNING") for s in states.values()):
            return
        failed = [n for n, s in states.items() if "FAIL" in s]
        if failed:
            pytest.exit(f"deploying {failed} failed: {apps[failed[0]].message}", 3)
        time.sleep(1)
    pytest.exit(f"apps not running after {timeout_s:.0f} s: {states}", 3)


@pytest.fixture(scope="session", params=LAYOUTS)
def layout(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="session")
def iris_app(iris_apps: dict[str, IrisApp], layout: str) -> IrisApp:
    return iris_apps[layout]


@pytest.fixture(scope="session")
def iris(iris_app: IrisApp) -> str:
    """Base URL (…/v1) of the real Iris app, in this test's layout."""
    return iris_app.base


@pytest.fixture(scope="session")
def iris_config(iris_app: IrisApp) -> Any:
    return iris_app.config
