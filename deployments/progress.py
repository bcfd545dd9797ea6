"""What `make serve` prints while it starts: each deployment as it starts and becomes ready,
what is still loading, and nothing misleading; and waiting for Ray's own output to settle so
that the ready line is the last one."""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Iterator
from typing import Any, TextIO

from handlers.config import IrisConfig


class DeployFailed(RuntimeError):
    """The app did not come up; the message is Serve's reason."""


# What each deployment does before it is ready, and how long that usually takes here.
ENGINE_LOAD = "loads the vLLM engine (usually 40-80 s on a small CPU machine)"
ENCODER_LOAD = "loads the encoder's vLLM engine (usually 30-60 s on a small CPU machine)"
# While replicas start, a line this often says what is still loading.
REMIND_S = 30.0


def say(t0: float, text: str) -> None:
    print(f">> [{time.monotonic() - t0:3.0f} s] {text}", flush=True)


def startup_notes(cfg: IrisConfig) -> dict[str, str]:
    """Per deployment: what it does before it is ready, and how long that usually takes."""
    return {
        "ImageFetcher": "fetches images (usually a few seconds)",
        "ImagePreprocessor": "resizes images, after a warm-up (usually 5-30 s)",
        "LLMServer": ENGINE_LOAD,
        "EmbeddingServer": ENCODER_LOAD,
        "ChatIngress": ingress_note(cfg),
    }


def ingress_note(cfg: IrisConfig) -> str:
    d = cfg.deployments
    engines = [ENGINE_LOAD] if d.engine_in_ingress and cfg.serve_chat else []
    if d.encoder_in_ingress and cfg.encoder is not None:
        engines.append(ENCODER_LOAD)
    return f"the HTTP API, and {'; then '.join(engines)}" if engines else (
        "the HTTP API (usually a few seconds)")


def wait_until_running(
    app_name: str, notes: dict[str, str], t0: float, *, poll_s: float = 1.0
) -> None:
    """Poll Serve's status until the app runs, printing each deployment as it starts and as
    it becomes ready, and every REMIND_S what is still loading. DeployFailed if it fails."""
    from ray import serve
    from ray.serve.schema import ApplicationStatus, DeploymentStatus

    started: dict[str, float] = {}
    ready: set[str] = set()
    reminded = time.monotonic()
    while True:
        app = serve.status().applications.get(app_name)
        now = time.monotonic()
        if app is not None:
            for name, dep in app.deployments.items():
                if name not in started:
                    started[name] = now
                    say(t0, f"{name} starting: {notes.get(name, 'a deployment of the app')}")
                if dep.status == DeploymentStatus.HEALTHY and name not in ready:
                    ready.add(name)
                    say(t0, f"{name} ready ({now - started[name]:.0f} s)")
            if app.status == ApplicationStatus.RUNNING:
                return
            if app.status in (ApplicationStatus.DEPLOY_FAILED, ApplicationStatus.UNHEALTHY):
                why = [f"{n}: {d.message}" for n, d in app.deployments.items()
                       if d.status != DeploymentStatus.HEALTHY and d.message]
                raise DeployFailed("\n".join([app.message, *why]).strip()
                                   or f"application {app_name!r} is {app.status.value}")
        if now - reminded >= REMIND_S:
            reminded = now
            loading = [f"{n} ({now - t:.0f} s so far)" for n, t in started.items()
                       if n not in ready]
            if loading:
                say(t0, "still starting: " + ", ".join(loading))
        time.sleep(poll_s)


class _NotMisleading(logging.Filter):
    """Serve's client logs, when the app is deployed after serve.start (which gave the
    proxy its port), that it connects to the running Serve instance and that "new
    http_options will not be applied": they were, by serve.start, a moment earlier."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Connecting to existing Serve app")


def quiet_serve_client_log() -> None:
    logger = logging.getLogger("ray.serve")
    if not any(isinstance(f, _NotMisleading) for f in logger.filters):
        logger.addFilter(_NotMisleading())


class _LastWrite:
    """A text stream that notes when it was last written to. Ray prints its processes'
    output on this process's stdout and stderr as it arrives, a moment after they wrote it."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self.at = time.monotonic()

    def write(self, text: str) -> int:
        self.at = time.monotonic()
        return self._stream.write(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


@contextlib.contextmanager
def watching_output() -> Iterator[list[_LastWrite]]:
    streams = [_LastWrite(sys.stdout), _LastWrite(sys.stderr)]
    sys.stdout, sys.stderr = streams
    try:
        yield streams
    finally:
        sys.stdout, sys.stderr = streams[0]._stream, streams[1]._stream


def settle(streams: list[_LastWrite], quiet_s: float = 2.5, max_s: float = 20.0) -> None:
    """Wait until Ray's processes' output stops arriving (quiet_s without a line, at most
    max_s): the readiness probe's access log, for one, arrives a moment after it was
    answered, and would otherwise be printed after the ready line."""
    deadline = time.monotonic() + max_s
    while time.monotonic() < deadline:
        idle = time.monotonic() - max(s.at for s in streams)
        if idle >= quiet_s:
            return
        time.sleep(quiet_s - idle)


