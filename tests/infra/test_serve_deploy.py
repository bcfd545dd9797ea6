"""The generated Serve config deploys with `serve deploy` on a real local Ray cluster. (The
session suite runs both layouts end to end; this is the deploy path: the CLI, the generated
config, the API key from the node's environment.)

The config is made by scripts/gen_infra.py's own functions (the code path of infra/serve.yaml)
from infra/local.yaml, the demo model on this machine's CPU. A separate head node is started
with the `ray start` CLI in its own process group, on its own ports and temp dir, so it never
touches a Ray instance the test session itself may run in-process; teardown kills that group
(never `ray stop`, which would stop every Ray on the machine). Slow: two vLLM engine starts."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.images import data_uri, encode, pattern
from tests.servers import free_port
from tests.support import load_generator

ROOT = Path(__file__).resolve().parents[2]
LOCAL_YAML = ROOT / "infra" / "local.yaml"
MODEL_DIR = ROOT / ".models" / "demo-vlm"
BIN = Path(sys.executable).parent
API_KEY = "iris-deploy-test-key"
HOST = "127.0.0.1"
DEPLOY_TIMEOUT_S = 420.0

pytestmark = pytest.mark.timeout(600)
gen = load_generator()


@dataclass
class Cluster:
    dashboard: str  # http://127.0.0.1:<port>, what `serve deploy --address` wants
    env: dict[str, str]
    log_dir: Path


def _clean_env() -> dict[str, str]:
    """The environment of the test cluster and of the CLIs talking to it: no RAY_ADDRESS (or
    any other RAY_* / IRIS_* leaking from this session), nothing phoning home, the Iris key
    from the env as on a real node (docs/deploy.md: the one thing nodes supply).

    Ray's token auth is on, as by default, but with a token of this cluster's own: `ray start`
    would otherwise share (or create) ~/.ray/auth_token with every other Ray on the machine."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "IRIS_"))}
    env.update(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=secrets.token_hex(32),
        IRIS_API_KEY=API_KEY,
        RAY_USAGE_STATS_ENABLED="0",
        VLLM_NO_USAGE_STATS="1",
        DO_NOT_TRACK="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        AWS_EC2_METADATA_DISABLED="true",
    )
    return env


def _descendants(pid: int) -> list[Any]:
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _kill_tree(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the `ray start --block` process group, then SIGKILL whatever of the tree is
    left (including processes that moved to a session of their own)."""
    import psutil

    tree = _descendants(proc.pid)
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass
    _, alive = psutil.wait_procs(tree, timeout=20)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=10)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=10)


def _wait_http(url: str, deadline: float, proc: subprocess.Popen[bytes]) -> None:
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url} did not answer")


@pytest.fixture
def ray_cluster() -> Iterator[Cluster]:
    if not (MODEL_DIR / "config.json").exists():
        pytest.skip("demo model missing: run `make demo-model`")
    # Short path: Ray's UNIX sockets live under it (108-byte limit).
    temp_dir = Path(tempfile.mkdtemp(prefix="iris-ray-", dir="/tmp"))
    dash_port = free_port()
    env = _clean_env()
    cmd = [
        str(BIN / "ray"), "start", "--head", "--block",
        f"--node-ip-address={HOST}",
        f"--port={free_port()}",
        f"--dashboard-host={HOST}",
        f"--dashboard-port={dash_port}",
        "--include-dashboard=true",
        # Every port Ray would otherwise take a fixed default for, so a second Ray on this
        # machine (e.g. the session's in-process one) keeps its own.
        f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
        f"--ray-client-server-port={free_port()}",
        f"--metrics-export-port={free_port()}",
        f"--node-manager-port={free_port()}",
        f"--object-manager-port={free_port()}",
        "--num-cpus=8",
        f"--object-store-memory={512 << 20}",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
    ]
    log = (temp_dir / "ray-start.log").open("wb")
    proc = subprocess.Popen(
        cmd, env=env, cwd=temp_dir, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        dashboard = f"http://{HOST}:{dash_port}"
        _wait_http(f"{dashboard}/api/version", time.monotonic() + 120, proc)
        yield Cluster(dashboard=dashboard, env=env, log_dir=temp_dir)
    finally:
        _kill_tree(proc)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _local_serve_config(http_port: int) -> dict[str, Any]:
    """infra/local.yaml through the generator, pointed at this machine's loopback, in the
    layout clusters deploy with `serve deploy`: the engine in its own LLMServer deployment.
    (`make serve`'s layout, the engine inside ChatIngress, is deployed by test_make_serve.)"""
    cfg = gen.load_source(LOCAL_YAML)
    cfg = cfg.model_copy(
        update={
            "http": cfg.http.model_copy(update={"host": HOST, "port": http_port}),
            "model": cfg.model.model_copy(update={"source": str(MODEL_DIR.resolve())}),
            "app_name": "iris-deploy-test",
            "deployments": cfg.deployments.model_copy(update={"engine_in_ingress": False}),
        }
    )
    return gen.serve_config(cfg)


def _serve(cluster: Cluster, *args: str, timeout: float = 120) -> str:
    out = subprocess.run(
        [str(BIN / "serve"), *args, "--address", cluster.dashboard],
        env=cluster.env, capture_output=True, text=True, timeout=timeout, check=False,
    )
    assert out.returncode == 0, f"serve {args[0]} failed:\n{out.stdout}\n{out.stderr}"
    return out.stdout


def _log_tails(log_dir: Path, lines: int = 12) -> str:
    """The end of the cluster's Serve logs (controller, proxy, replicas) and of its raylet's:
    what a stuck deploy was doing, for the failure message (the fixture deletes the temp dir)."""
    logs = log_dir / "session_latest" / "logs"
    paths = [*sorted((logs / "serve").glob("*.log")), logs / "raylet.out", logs / "gcs_server.out"]
    out = []
    for path in paths:
        try:
            tail = path.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            continue
        out.append(f"--- {path.relative_to(logs)}\n" + "\n".join(tail))
    return "\n".join(out)


def _wait_running(cluster: Cluster, app_name: str) -> None:
    deadline = time.monotonic() + DEPLOY_TIMEOUT_S
    status: Any = None
    while time.monotonic() < deadline:
        status = yaml.safe_load(_serve(cluster, "status")) or {}
        app = (status.get("applications") or {}).get(app_name) or {}
        if app.get("status") == "RUNNING":
            return
        if app.get("status") == "DEPLOY_FAILED":
            pytest.fail(f"deploy failed:\n{yaml.safe_dump(status)}")
        time.sleep(5)
    pytest.fail(f"app not RUNNING after {DEPLOY_TIMEOUT_S:.0f} s:\n{yaml.safe_dump(status)}\n"
                f"{_log_tails(cluster.log_dir)}")


def _chat(client: httpx.Client, prefix: str, model: str, stream: bool) -> httpx.Response:
    image = data_uri(encode(pattern(64, 48, seed=3)))
    body = {
        "model": model,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is in this image?"},
                    {"type": "image_url", "image_url": {"url": image}},
                ],
            }
        ],
        "max_tokens": 4,
        "stream": stream,
    }
    headers = {"Authorization": f"Bearer {API_KEY}"}
    return client.post(f"{prefix}/v1/chat/completions", json=body, headers=headers)


def test_serve_deploy_on_a_local_ray_cluster(ray_cluster: Cluster, tmp_path: Path) -> None:
    http_port = free_port()
    config = _local_serve_config(http_port)
    (app,) = config["applications"]
    assert config["http_options"] == {"host": HOST, "port": http_port}
    assert app["import_path"] == gen.IMPORT_PATH and "api_key" not in app["args"]
    assert app["args"]["engine"]["env"] == {"VLLM_CPU_KVCACHE_SPACE": "1"}
    config_path = tmp_path / "serve.yaml"
    config_path.write_text(gen.dump_yaml(config))

    t0 = time.monotonic()
    _serve(ray_cluster, "deploy", str(config_path))
    _wait_running(ray_cluster, app["name"])
    deployed_s = time.monotonic() - t0
    apps = (yaml.safe_load(_serve(ray_cluster, "status")) or {})["applications"]
    fused = app["args"]["deployments"]["engine_in_ingress"]
    assert ("LLMServer" in apps[app["name"]]["deployments"]) is not fused

    model = app["args"]["model"]["id"]
    with httpx.Client(base_url=f"http://{HOST}:{http_port}", timeout=120) as client:
        # The key comes from the nodes' IRIS_API_KEY, not from the generated args.
        assert client.get("/v1/models").status_code == 401
        resp = _chat(client, "", model, stream=False)
        assert resp.status_code == 200, resp.text
        assert resp.json()["usage"]["completion_tokens"] >= 1
        streamed = _chat(client, "", model, stream=True)
        assert streamed.status_code == 200, streamed.text
        assert streamed.text.count('"delta"') >= 2
        assert streamed.text.endswith("data: [DONE]\n\n")
    print(f"\n[serve deploy] RUNNING in {deployed_s:.0f} s", file=sys.stderr)
