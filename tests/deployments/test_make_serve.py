"""`make serve` as the user meets it: `python -m deployments.run` in a terminal, its output,
Ctrl-C, and `make serve` again right away.

Each run is its own process with its own local Ray instance (not the session's, which a
fixture may have started in this process: the environment is cleaned of RAY_ADDRESS and
every RAY_* / IRIS_* variable), in a session of its own, so Ctrl-C can be sent the way a
terminal sends it: SIGINT to the whole foreground process group, Ray's own processes
included. Nothing here stops Ray in any other way (no `ray stop`).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from handlers.cpu_affinity import split_cores
from handlers.reaper import alive
from tests.servers import free_port

ROOT = Path(__file__).resolve().parents[2]
MODEL_DIR = ROOT / ".models" / "demo-vlm"
READY = re.compile(r"^>> ready in \d+ s: OpenAI API at (http://\S+/v1) "
                   r"\(model '([^']+)'; encoder '([^']+)'\)")
PROGRESS = re.compile(r"^>> \[\s*\d+ s\] ")
# The machine is shared and slow: these only stop a hung run, they time nothing.
START_TIMEOUT_S = 600.0
STOP_TIMEOUT_S = 180.0
# After the ready line: how long to watch for anything printed after it.
AFTER_READY_S = 5.0
# Ray's own start gives up after a fixed 30 s (ray/_private/node.py) on a machine busy enough;
# Iris has not done anything yet then. Such a run is started again, at most this often.
RAY_DID_NOT_START = "The current node timed out during startup"
RAY_START_ATTEMPTS = 3

pytestmark = [
    pytest.mark.skipif(not (MODEL_DIR / "config.json").exists(),
                       reason="demo model missing: run `make demo-model`"),
    pytest.mark.own_ray,
]


def _env(**iris: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IRIS_", "RAY_"))}
    env.update(iris)
    env["PYTHONUNBUFFERED"] = "1"
    return env


class RayDidNotStart(Exception):
    """Ray's own start timed out (a busy machine), before Iris did anything."""


class Run:
    """`python -m deployments.run`, started as a terminal would, its output read as printed."""

    def __init__(self, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "deployments.run"], cwd=ROOT, env=env,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, bufsize=1, start_new_session=True,
        )
        self.lines: list[str] = []
        self.tree: dict[int, psutil.Process] = {}
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def _next(self, timeout: float) -> str | None:
        """The next line; None at the end of the output. queue.Empty on timeout."""
        line = self._queue.get(timeout=max(timeout, 0.01))
        if line is not None:
            self.lines.append(line)
        return line

    def wait_for(self, pattern: re.Pattern[str], timeout: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while True:
            self.remember_tree()
            try:
                line = self._next(min(5.0, deadline - time.monotonic()))
            except queue.Empty:
                if time.monotonic() > deadline:
                    raise AssertionError(
                        f"no line like {pattern.pattern!r} within {timeout:.0f} s:\n"
                        + self.tail()) from None
                continue
            if line is None:
                if any(RAY_DID_NOT_START in seen for seen in self.lines):
                    raise RayDidNotStart(self.tail())
                raise AssertionError(f"exited ({self.proc.wait()}) before a line like "
                                     f"{pattern.pattern!r}:\n" + self.tail())
            match = pattern.search(line)
            if match:
                return match

    def lines_during(self, seconds: float) -> list[str]:
        """The lines printed in the next `seconds`."""
        start = len(self.lines)
        deadline = time.monotonic() + seconds
        with contextlib.suppress(queue.Empty):
            while time.monotonic() < deadline:
                if self._next(deadline - time.monotonic()) is None:
                    break
        return self.lines[start:]

    def remember_tree(self) -> None:
        """Every process this run started so far (Ray's, the replicas', vLLM's)."""
        with contextlib.suppress(psutil.Error):
            for proc in [psutil.Process(self.proc.pid),
                         *psutil.Process(self.proc.pid).children(recursive=True)]:
                self.tree.setdefault(proc.pid, proc)

    def ctrl_c(self) -> None:
        """What Ctrl-C in a terminal does: SIGINT to the foreground process group."""
        os.killpg(self.proc.pid, signal.SIGINT)

    def wait_exit(self, timeout: float) -> int:
        """The exit code, once the output has ended too (read to the last line)."""
        code = self.proc.wait(timeout)
        deadline = time.monotonic() + 30
        with contextlib.suppress(queue.Empty):
            while self._next(deadline - time.monotonic()) is not None:
                pass
        return code

    def leftovers(self, grace_s: float = 30.0) -> list[psutil.Process]:
        """Processes of this run still alive after `grace_s` (zombies count as gone)."""
        deadline = time.monotonic() + grace_s
        while True:
            left = [p for p in self.tree.values() if alive(p)]
            if not left or time.monotonic() > deadline:
                return left
            time.sleep(0.5)

    def kill(self) -> None:
        """Leave nothing behind, whatever happened."""
        self.remember_tree()
        for proc in self.tree.values():
            with contextlib.suppress(psutil.Error):
                proc.kill()
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait(10)

    def tail(self, n: int = 60) -> str:
        return "\n".join(self.lines[-n:])


def _describe(procs: list[psutil.Process]) -> str:
    out = []
    for p in procs:
        with contextlib.suppress(psutil.Error):
            out.append(f"{p.pid} {' '.join(p.cmdline())[:120]}")
    return "\n".join(out)


@contextlib.contextmanager
def running(env: dict[str, str]) -> Iterator[Run]:
    run = Run(env)
    try:
        yield run
    finally:
        run.kill()


@contextlib.contextmanager
def serving(env: dict[str, str]) -> Iterator[tuple[Run, re.Match[str]]]:
    """A run that printed its ready line, and that line. A run whose Ray did not start in
    Ray's own time (RAY_DID_NOT_START) is started again; any other failure fails."""
    for attempt in range(1, RAY_START_ATTEMPTS + 1):
        with running(env) as run:
            try:
                match = run.wait_for(READY, START_TIMEOUT_S)
            except RayDidNotStart as exc:
                if attempt == RAY_START_ATTEMPTS:
                    raise AssertionError(f"Ray did not start, {attempt} times:\n{exc}") from None
                print(f"[make serve] Ray did not start in time, again ({attempt})",
                      file=sys.stderr)
                continue
            yield run, match
            return


def _get(url: str) -> tuple[int, bytes]:
    """GET as curl does: a keep-alive request, and the client closes first."""
    m = re.match(r"http://([^:/]+):(\d+)(/.*)", url)
    assert m, url
    conn = http.client.HTTPConnection(m[1], int(m[2]), timeout=30)
    try:
        conn.request("GET", m[3])
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def test_a_misspelled_setting_stops_the_start() -> None:
    env = _env(IRIS_API_KEYS="secret", IRIS_HTTP__PORT=str(free_port()),
               IRIS_METRICS_PORT=str(free_port()))
    with running(env) as run:
        code = run.wait_exit(120)
        output = "\n".join(run.lines)
        assert code == 2, output
        assert "IRIS_API_KEYS is not an Iris setting" in output
        assert "did you mean IRIS_API_KEY?" in output
        assert ">> starting a local Ray" not in output
        assert "Traceback" not in output


def _check_ready(
    run: Run, match: re.Match[str], port: int, proxy_port: int, metrics_port: int
) -> None:
    """What was printed up to the ready line, and that it was the last line; the API and
    the metrics answer."""
    assert run.lines_during(AFTER_READY_S) == [], "printed after the ready line:\n" + run.tail()
    base, model, encoder = match[1], match[2], match[3]
    assert base == f"http://127.0.0.1:{port}/v1", run.tail()
    out = run.lines
    # The proxy's address is not one to use (clients connect to ChatIngress directly).
    assert not [line for line in out if f"is ready at http://127.0.0.1:{proxy_port}" in line]
    assert not [line for line in out if "in use" in line or "could not take" in line]
    # Progress as it happens, instead of Serve's "slow __init__" warnings at 30 s.
    progress = [line for line in out if PROGRESS.match(line)]
    assert any("ChatIngress starting" in line for line in progress), run.tail()
    assert any("ChatIngress ready" in line for line in progress), run.tail()
    assert not [line for line in out if "more than 30s to initialize" in line]
    metrics = f"http://127.0.0.1:{metrics_port}/metrics"
    assert f">> metrics (Prometheus): {metrics}" in out[:-1], run.tail()
    status, body = _get(f"{base}/models")
    assert status == 200, body
    assert [m["id"] for m in json.loads(body)["data"]] == [model, encoder]
    status, body = _get(metrics)
    assert status == 200 and b"# TYPE" in body


def _stop_and_check(run: Run) -> None:
    """Ctrl-C: a quiet stop, exit 0, and no process of the run left."""
    run.remember_tree()  # vLLM's engine core among them: it can outlive its parent
    before = len(run.lines)
    run.ctrl_c()
    code = run.wait_exit(STOP_TIMEOUT_S)
    after = run.lines[before:]
    assert code == 0, "\n".join(after)
    assert ">> stopping" in after and after[-1] == ">> stopped", "\n".join(after)
    assert not [line for line in after if "Traceback" in line], "\n".join(after)
    assert not [line for line in after if "graceful_shutdown failed" in line], "\n".join(after)
    assert len(run.tree) > 1
    left = run.leftovers()
    assert not left, "left running after the stop:\n" + _describe(left)


def _chat_worker_cores(run: Run) -> set[int]:
    """The cores the chat engine's vLLM worker threads are bound to (the worker under the
    EngineCore that ChatIngress started; the encoder has one of its own)."""
    run.remember_tree()
    for proc in run.tree.values():
        with contextlib.suppress(psutil.Error):
            engine_core = proc.parent()
            replica = engine_core.parent() if engine_core else None
            if (proc.name().startswith("VLLM::Worker") and replica is not None
                    and "ChatIngress" in " ".join(replica.cmdline())):
                return {c for t in proc.threads() for c in os.sched_getaffinity(t.id)}
    raise AssertionError("no chat engine worker among:\n" + _describe(list(run.tree.values())))


def _cores_of(run: Run, name: str) -> set[int]:
    """The cores the threads of the run's process `name` may run on: an executable's name,
    or the start of a Ray worker's title (ray::...)."""
    run.remember_tree()
    for proc in run.tree.values():
        with contextlib.suppress(psutil.Error):
            if proc.name() == name or " ".join(proc.cmdline()).startswith(name):
                return {c for t in proc.threads() for c in os.sched_getaffinity(t.id)}
    raise AssertionError(f"no {name!r} among:\n" + _describe(list(run.tree.values())))


@pytest.mark.timeout(1500)
def test_start_ctrl_c_and_start_again_at_once() -> None:
    """infra/local.yaml places the engine (cpu_cores: auto) with its worker's threads on
    every core (cpu_worker_threads: all) and Ray's own processes on the engine's cores
    (ray_cores: engine), the replicas on the others; the second run keeps the worker's
    threads on the engine's cores and starts Ray beside the replicas."""
    port, proxy_port, metrics_port = free_port(), free_port(), free_port()
    env = _env(IRIS_HTTP__PORT=str(port), IRIS_HTTP__PROXY_PORT=str(proxy_port),
               IRIS_METRICS_PORT=str(metrics_port))
    cores = sorted(os.sched_getaffinity(0))
    split = split_cores(cores, "auto")
    with serving(env) as (first, ready):
        _check_ready(first, ready, port, proxy_port, metrics_port)
        if split is not None:
            engine, others = split
            assert (f">> CPU engine and Ray's own processes on cores {engine} (its worker's "
                    f"threads on every core); the replicas on {others}") in first.lines, \
                first.tail()
            assert _chat_worker_cores(first) == set(cores)
            assert _cores_of(first, "gcs_server") == set(engine)
            assert _cores_of(first, "ray::ServeController") == set(engine)
            assert _cores_of(first, "ray::ServeReplica:iris:ChatIngress") == set(others)
            assert _cores_of(first, "ray::ServeReplica:iris:ImagePreprocessor") == set(others)
        _stop_and_check(first)
    # Right away, on the same ports: the first run's connections may still be closing.
    with serving({**env, "IRIS_ENGINE__CPU_WORKER_THREADS": "engine",
                  "IRIS_ENGINE__RAY_CORES": "replicas"}) as (second, ready):
        _check_ready(second, ready, port, proxy_port, metrics_port)
        if split is not None:
            assert (f">> CPU engine on cores {engine}; Ray and the replicas on {others}"
                    in second.lines), second.tail()
            assert _chat_worker_cores(second) == set(split[0])
            assert _cores_of(second, "gcs_server") == set(others)
            assert _cores_of(second, "ray::ServeReplica:iris:ChatIngress") == set(others)
        _stop_and_check(second)
