"""One request id across the whole path: echoed to the client and on the log lines of
every replica the request went through."""

from __future__ import annotations

import logging
import logging.handlers
import re
import time
import uuid
from pathlib import Path

import pytest

from deployments.logs import keep_serve_log_handlers
from tests.images import encode, pattern
from tests.servers import ImageServer
from tests.support import IrisApp, good_body, image_msg, post_chat


def serve_log_dir() -> Path:
    import ray

    return Path(ray._private.worker._global_node.get_logs_dir_path()) / "serve"


def files_mentioning(rid: str) -> set[str]:
    return {p.name.split("_")[0] if p.name.startswith("proxy") else p.name.split("_")[2]
            for p in serve_log_dir().glob("*.log") if rid in p.read_text(errors="replace")}


def replicas(app: IrisApp) -> set[str]:
    """Every replica a request with a new image visits, in this app's layout."""
    return {"ChatIngress", "ImageFetcher", "ImagePreprocessor", app.engine_deployment}


@pytest.mark.parametrize("entry", ["client", "proxy"])
def test_request_id_in_every_replica_log(
    entry: str, iris_app: IrisApp, image_server: ImageServer
) -> None:
    """Where clients connect (direct ingress in the local layout, Serve's proxy in the
    split one), and through Serve's proxy: one id end to end, in every replica's log."""
    base = iris_app.base if entry == "client" else iris_app.proxy_base
    rid = f"iris-test-{uuid.uuid4().hex}"
    # A never-seen image over http: the request visits the fetcher and the preprocessor.
    url = image_server.add_bytes(f"/rid-{rid}.png", encode(pattern(96, 80, seed=77)))
    resp = post_chat(base, good_body(messages=image_msg(url)), headers={"x-request-id": rid})
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-request-id"] == rid
    want = replicas(iris_app) | ({"proxy"} if base == iris_app.proxy_base else set())
    deadline = time.monotonic() + 30
    while (seen := files_mentioning(rid)) != want and time.monotonic() < deadline:
        time.sleep(0.5)
    assert seen == want
    # The console (the replicas' stderr, which Ray forwards to make serve's terminal) gets
    # the ingress's access line for it; the internal calls' stay in the files above.
    while not (shown := access_lines_on_console(rid)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert shown == {"ChatIngress"}


# Serve's access line: "<level> <time> <app>_<deployment> <replica> <request id> -- CALL
# prepare OK 5.1ms" (an internal call), or "... -- POST /v1/chat/completions 200 80.2ms".
ACCESS_LINE = re.compile(r"\S+_(ChatIngress|ImageFetcher|ImagePreprocessor|LLMServer|"
                         r"EmbeddingServer) .* -- [A-Z]+ \S+ \S+ [\d.]+ms$")


def access_lines_on_console(rid: str) -> set[str]:
    """The deployments whose replicas wrote an access line for `rid` to their stderr."""
    logs = serve_log_dir().parent
    return {m.group(1) for p in logs.glob("worker-*.err")
            for line in p.read_text(errors="replace").splitlines()
            if rid in line and (m := ACCESS_LINE.search(line))}


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


def lines_with(rid: str, replica: str) -> list[tuple[str, str]]:
    """Each log line of `replica` naming `rid`, with the line that follows it."""
    out = []
    for path in serve_log_dir().glob(f"replica_*_{replica}_*.log"):
        lines = path.read_text(errors="replace").splitlines()
        out += [(ln, lines[i + 1] if i + 1 < len(lines) else "")
                for i, ln in enumerate(lines) if rid in ln]
    return out


@pytest.mark.parametrize("case", ["missing", "not-an-image", "refused"])
def test_a_client_mistake_is_one_warning_line_not_a_traceback(
    case: str, iris: str, image_server: ImageServer
) -> None:
    rid = f"iris-test-{uuid.uuid4().hex}"
    url = {
        "missing": image_server.url(f"/nope-{rid}.png"),
        "not-an-image": image_server.add_bytes(f"/text-{rid}.png", b"hello, not an image"),
        "refused": "http://127.0.0.1:1/closed.png",  # nothing listens on port 1
    }[case]
    resp = post_chat(iris, good_body(messages=image_msg(url)), headers={"x-request-id": rid})
    assert resp.status_code == 400, resp.text
    deadline = time.monotonic() + 30
    while len(lines_with(rid, "ImagePreprocessor")) < 2 and time.monotonic() < deadline:
        time.sleep(0.5)  # the access line comes after the failure line
    for replica in ("ImageFetcher", "ImagePreprocessor"):
        lines = lines_with(rid, replica)
        failures = [(ln, nxt) for ln, nxt in lines if "Client error 400" in ln]
        assert len(failures) == 1, lines
        line, following = failures[0]
        assert line.startswith("WARNING") and "Traceback" not in following, failures
        assert not any(ln.startswith("ERROR") for ln, _ in lines), lines
