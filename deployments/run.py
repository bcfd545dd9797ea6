"""`make serve`: a local Ray instance + the Iris app until Ctrl-C."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from http.client import HTTPException
from typing import Any

from handlers.config import IrisConfig, load_config
from handlers.cpu_affinity import OMP_BIND_ENV, engine_core_split, omp_bind, pinned

# The port init_ray started a local Ray instance with direct ingress on, if it did.
_direct_ingress_port: int | None = None


def _socket(host: str) -> socket.socket:
    return socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)


class PortInUse(RuntimeError):
    """A port Iris is configured to serve on is taken by another process."""


@contextlib.contextmanager
def holding(host: str, ports: list[int]) -> Iterator[None]:
    """Hold `ports` bound while Ray starts: Ray's processes pick free ports of their own
    as they start, and one of them could otherwise take the port clients were told."""
    socks: list[socket.socket] = []
    try:
        for port in ports:
            sock = _socket(host)
            socks.append(sock)
            try:
                sock.bind((host, port))
            except OSError as exc:
                raise PortInUse(f"{host}:{port} is in use by another process ({exc.strerror}); "
                                "choose another with IRIS_HTTP__PORT / http.port") from None
        yield
    finally:
        for sock in socks:
            sock.close()


def init_ray(cfg: IrisConfig, *, num_cpus: int | None = None, **kwargs: Any) -> None:
    """Start a local Ray instance (more logical CPUs than cores, so all replicas fit) whose
    processes carry the settings `cfg` needs: direct ingress, and a CPU engine's worker
    on cores of its own (engine.cpu_cores) with every Ray process on the others."""
    import ray

    global _direct_ingress_port
    cpus = num_cpus or max(8, os.cpu_count() or 1)
    print(f">> starting a local Ray instance ({cpus} logical CPUs)", flush=True)
    extra = cfg.http.direct_ingress_env()
    split = engine_core_split(cfg.engine)
    if split is not None:
        extra[OMP_BIND_ENV] = omp_bind(split[0])
        print(f">> CPU engine worker on cores {split[0]}; Ray and the replicas on {split[1]}",
              flush=True)
    saved = {k: os.environ.get(k) for k in extra}
    # Ray's processes inherit this environment and CPU affinity when they start; put them
    # back afterwards so other Ray clusters this process starts (tests) do not inherit them.
    new_instance = not (kwargs.get("address") or os.environ.get("RAY_ADDRESS"))
    http = cfg.http
    ports = [p for p in (http.port, http.proxy_port) if p] if new_instance else []
    os.environ.update(extra)
    try:
        with pinned(split[1] if split else []), holding(http.host, ports):
            ray.init(num_cpus=cpus, include_dashboard=False, **kwargs)
        _direct_ingress_port = http.port if http.direct_ingress and new_instance else None
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _free_port(host: str) -> int:
    with _socket(host) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _ingress_answers(host: str, port: int, wait_s: float = 10.0) -> bool:
    """Whether ChatIngress answers on host:port: it echoes the x-request-id it is sent,
    which another process that happens to hold the port would not."""
    host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)
    url = f"http://[{host}]:{port}/health" if ":" in host else f"http://{host}:{port}/health"
    token = uuid.uuid4().hex
    deadline = time.monotonic() + wait_s
    while True:
        try:
            req = urllib.request.Request(url, headers={"x-request-id": token})
            with urllib.request.urlopen(req, timeout=2) as resp:
                if resp.headers.get("x-request-id") == token:
                    return True
        except (OSError, HTTPException):
            pass
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)


def start(cfg: IrisConfig, *, num_cpus: int | None = None) -> int:
    """Start Ray unless connected, start Serve's HTTP side and deploy the app.
    Returns the port clients should use."""
    import ray
    from ray import serve

    from deployments.app import build_app

    if not ray.is_initialized():
        init_ray(cfg, num_cpus=num_cpus, log_to_driver=True)
    http = cfg.http
    direct = http.direct_ingress and (
        _direct_ingress_port == http.port or http.direct_ingress_active()
    )
    if http.direct_ingress and not direct:
        print(">> http.direct_ingress needs RAY_SERVE_ENABLE_DIRECT_INGRESS=1 where Ray "
              "started; serving through Serve's proxy instead", flush=True)
    if direct:
        # ChatIngress binds http.port itself; the proxy goes elsewhere.
        proxy_port = http.proxy_port or _free_port(http.host)
        print(f">> direct ingress: ChatIngress listens on {http.host}:{http.port}, "
              f"Serve's proxy on {http.host}:{proxy_port}", flush=True)
    else:
        proxy_port = http.port
    serve.start(http_options={"host": http.host, "port": proxy_port})
    print(f">> deploying {cfg.app_name!r} (model {cfg.model.id!r} from {cfg.model.source})",
          flush=True)
    # serve.run waits until every deployment is RUNNING (the engine has loaded).
    serve.run(build_app(cfg), name=cfg.app_name, route_prefix="/", blocking=False)
    if direct and not _ingress_answers(http.host, http.port):
        # Serve moves an ingress replica that cannot bind its port to the next one.
        print(f">> ChatIngress could not take {http.host}:{http.port} (in use?); clients "
              f"reach Iris through Serve's proxy on port {proxy_port} instead", flush=True)
        return proxy_port
    return http.port


def main() -> int:
    import ray
    from ray import serve

    cfg = load_config()
    t0 = time.monotonic()
    try:
        port = start(cfg)
    except PortInUse as exc:
        print(f">> {exc}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        serve.shutdown()
        ray.shutdown()
        return 130
    base = f"http://{cfg.http.host}:{port}/v1"
    print(f">> ready in {time.monotonic() - t0:.0f} s: OpenAI API at {base} "
          f"(model {cfg.model.id!r}). Ctrl-C stops everything.", flush=True)
    stop = False

    def _stop(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    while not stop:
        time.sleep(0.5)
    print(">> shutting down", flush=True)
    serve.shutdown()
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
