"""One request id across the whole path: echoed to the client and on the log lines of
every replica the request went through."""

from __future__ import annotations

import logging
import logging.handlers
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from deployments.llm_server import keep_serve_log_handlers
from tests.deployments.test_api_contract import good_body, post_chat
from tests.deployments.test_chat_e2e import image_msg
from tests.images import encode, pattern
from tests.servers import ImageServer


def serve_log_dir() -> Path:
    import ray

    return Path(ray._private.worker._global_node.get_logs_dir_path()) / "serve"


def files_mentioning(rid: str) -> set[str]:
    return {p.name.split("_")[0] if p.name.startswith("proxy") else p.name.split("_")[2]
            for p in serve_log_dir().glob("*.log") if rid in p.read_text(errors="replace")}


def replicas(iris_config: Any) -> set[str]:
    """Every replica a request with a new image visits, in the suite's layout."""
    seen = {"ChatIngress", "ImageFetcher", "ImagePreprocessor"}
    return seen if iris_config.deployments.engine_in_ingress else seen | {"LLMServer"}


@pytest.mark.parametrize("entry", ["direct", "proxy"])
def test_request_id_in_every_replica_log(
    entry: str, iris: str, iris_config: Any, image_server: ImageServer
) -> None:
    """Direct ingress (the port clients use) skips Serve's proxy; its proxy_port goes
    through it. Both keep one id end to end."""
    assert iris_config.http.direct_ingress  # infra/local.yaml's setting, which the tests use
    http = iris_config.http
    base = iris if entry == "direct" else f"http://{http.host}:{http.proxy_port}/v1"
    rid = f"iris-test-{uuid.uuid4().hex}"
    # A never-seen image over http: the request visits the fetcher and the preprocessor.
    url = image_server.add_bytes(f"/rid-{rid}.png", encode(pattern(96, 80, seed=77)))
    resp = post_chat(base, good_body(messages=image_msg(url)), headers={"x-request-id": rid})
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-request-id"] == rid
    want = replicas(iris_config) | ({"proxy"} if entry == "proxy" else set())
    deadline = time.monotonic() + 30
    while (seen := files_mentioning(rid)) != want and time.monotonic() < deadline:
        time.sleep(0.5)
    assert seen == want


def test_serve_log_lines_survive_vllm_logging_setup(tmp_path: Path) -> None:
    """vLLM's dictConfig closes Serve's MemoryHandler; its lines must still reach the file."""
    target = logging.FileHandler(tmp_path / "replica.log")
    memory = logging.handlers.MemoryHandler(capacity=1, target=target)
    serve_logger = logging.getLogger("ray.serve.test-keep")
    serve_logger.propagate = False
    serve_logger.addHandler(memory)
    try:
        with keep_serve_log_handlers("ray.serve.test-keep"):
            memory.close()  # what dictConfig does to every existing handler
        serve_logger.warning("after vllm's logging setup")
        memory.flush()
        assert "after vllm's logging setup" in (tmp_path / "replica.log").read_text()
    finally:
        serve_logger.removeHandler(memory)
        memory.close()
        target.close()
