"""`make serve`: a local Ray instance + the Iris app until Ctrl-C."""

from __future__ import annotations

import contextlib
import errno
import http.client
import os
import signal
import socket
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deployments.progress import (
    DeployFailed,
    quiet_serve_client_log,
    say,
    settle,
    startup_notes,
    wait_until_running,
    watching_output,
)
from handlers.config import IrisConfig
from handlers.config_load import ConfigError, load_config
from handlers.cpu_affinity import (
    OMP_BIND_ENV,
    REPLICA_CORES_ENV,
    engine_core_split,
    omp_bind,
    pinned,
    ray_start_cores,
)


@dataclass(frozen=True)
class LocalRay:
    """What init_ray set up when it started a Ray instance here."""

    direct_ingress_port: int | None  # where ChatIngress listens, with direct ingress
    metrics_port: int  # the node's Prometheus endpoint


@dataclass(frozen=True)
class Serving:
    """Where clients reach the running app."""

    port: int
    metrics_port: int | None


# Serve's controller warns about every replica whose __init__ runs past this many seconds
# (default 30): on a small CPU machine the engine always does, so every start printed
# "slow __init__" warnings. `make serve` reports what is loading itself (wait_until_running);
# Serve still warns, and says so in the app's status, about a replica that is really stuck.
# The controller reads it when it starts, from the environment Ray's processes inherit.
SLOW_STARTUP_ENV = "RAY_SERVE_SLOW_STARTUP_WARNING_S"
SLOW_STARTUP_S = 300

# Ray settings for every process of a Ray instance Iris starts; a value already in the
# environment wins. On a cluster started elsewhere, the same values go into the nodes'
# environment (infra/kuberay/rayservice.yaml, infra/aws/cluster.yaml). Their effect, measured
# with load_tests.compare: docs/benchmarks.md (compare-18, compare-19).
RAY_TUNING_ENV = {
    # Replica code and each handle's router on the replica's own event loop: two thread
    # hops less per call. Ray's throughput-optimised values, which Ray plans to make its
    # defaults (ray-project/ray#61226). Iris's replicas are async and keep long work off
    # their loop (decodes in threads, engines in their own processes).
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
    # Objects up to 4 MiB travel inside Ray's task messages, not through the object store
    # (Ray's default: 100 KiB). A photo's data: URI (~250 KB) and its prepared pixels (~1 MB)
    # then cost no object-store put and get per hop; a 12 MP JPEG's data: URI (~9 MB) still
    # goes through the store.
    "RAY_max_direct_call_object_size": str(4 << 20),
}

# Where to reach a server bound to a wildcard address.
_LOOPBACK = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}


def ephemeral_ports() -> range:
    """The ports the kernel hands out for outgoing connections (32768-60999 on Linux)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[:2]
        return range(int(low), int(high) + 1)
    except (OSError, ValueError):
        return range(32768, 61000)


def _socket(host: str) -> socket.socket:
    return socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)


class PortInUse(RuntimeError):
    """A port Iris is configured to serve on is taken by another process."""


def _listening(host: str, port: int) -> bool:
    """Whether something accepts connections on host:port (a refused connect: nothing)."""
    host = _LOOPBACK.get(host, host)
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except ConnectionRefusedError:
        return False
    except OSError:
        return True  # no answer either way: assume it is taken


@contextlib.contextmanager
def holding(host: str, ports: list[int]) -> Iterator[None]:
    """Hold `ports` bound while Ray starts: Ray's processes pick free ports of their own
    as they start, and one of them could otherwise take the port clients were told.

    A port something LISTENS on is refused (PortInUse). A port only connections of an
    earlier run still hold while they close (TIME_WAIT, up to a minute) is not: a restart
    right after Ctrl-C must work. With SO_REUSEADDR the hold binds past such connections of
    a server that set it too (Ray's metrics agent, which also binds its port while it is held
    here, does). Those of a server that did not (Serve's direct ingress) refuse every bind;
    such a port is not held, its TIME_WAIT keeps Ray's processes off it meanwhile."""
    socks: list[socket.socket] = []
    try:
        for port in ports:
            sock = _socket(host)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, port))
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE and not _listening(host, port):
                    print(f">> {host}:{port}: connections of an earlier run are still closing "
                          "(TIME_WAIT, gone within a minute of their close)", flush=True)
                    continue
                raise PortInUse(f"{host}:{port} is in use by another process ({exc.strerror}); "
                                "choose another with IRIS_HTTP__PORT / http.port") from None
        yield
    finally:
        for sock in socks:
            sock.close()


def init_ray(cfg: IrisConfig, *, num_cpus: int | None = None, **kwargs: Any) -> LocalRay | None:
    """Start a local Ray instance (more logical CPUs than cores, so all replicas fit) whose
    processes carry Iris's Ray settings (RAY_TUNING_ENV) and those `cfg` needs: direct
    ingress, and a CPU engine's worker on cores of its own (engine.cpu_cores) with every Ray
    process on the others. None when it connected to a Ray instance started elsewhere."""
    import ray

    cpus = num_cpus or max(8, os.cpu_count() or 1)
    print(f">> starting a local Ray instance ({cpus} logical CPUs)", flush=True)
    extra = {k: v for k, v in RAY_TUNING_ENV.items() if k not in os.environ}
    extra.update(cfg.http.direct_ingress_env())
    # Also when only the encoder is served: its worker (and EmbeddingServer) take the
    # engine's cores instead. Whether no split would serve embeddings better is not measured
    # (docs/benchmarks.md, compare-17).
    split = engine_core_split(cfg.engine)
    start_on, replicas_on = ray_start_cores(cfg.engine, split)
    if split is not None:
        extra[OMP_BIND_ENV] = omp_bind(split[0])
        also = " (its worker's threads on every core)" if (
            cfg.engine.cpu_worker_threads == "all") else ""
        if replicas_on:
            # Replicas start where Ray does and move themselves (to_replica_cores).
            extra[REPLICA_CORES_ENV] = omp_bind(replicas_on)
            print(f">> CPU engine and Ray's own processes on cores {split[0]}{also}; "
                  f"the replicas on {split[1]}", flush=True)
        else:
            print(f">> CPU engine on cores {split[0]}{also}; Ray and the replicas on "
                  f"{split[1]}", flush=True)
    # Ray's processes inherit this environment and CPU affinity when they start; put them
    # back afterwards so other Ray clusters this process starts (tests) do not inherit them.
    address = kwargs.get("address")
    new_instance = address == "local" or not (address or os.environ.get("RAY_ADDRESS"))
    http = cfg.http
    ports = [p for p in (http.port, http.proxy_port) if p] if new_instance else []
    if new_instance:
        # A new instance even if `ray start` once left the address of its cluster behind
        # (ray.init() without an address connects to that one).
        kwargs["address"] = "local"
        # A fixed port for the node's Prometheus endpoint (Ray picks a random one otherwise).
        kwargs.setdefault("_metrics_export_port", cfg.metrics_port)
        ports.append(kwargs["_metrics_export_port"])
        if SLOW_STARTUP_ENV not in os.environ:
            extra[SLOW_STARTUP_ENV] = str(SLOW_STARTUP_S)
    saved = {k: os.environ.get(k) for k in extra}
    os.environ.update(extra)
    try:
        with pinned(start_on), holding(http.host, ports):
            ray.init(num_cpus=cpus, include_dashboard=False, **kwargs)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    if not new_instance:
        return None
    return LocalRay(http.port if http.direct_ingress else None, kwargs["_metrics_export_port"])


def _free_port(host: str) -> int:
    with _socket(host) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _ingress_answers(host: str, port: int, wait_s: float = 10.0) -> bool:
    """Whether ChatIngress answers on host:port: it echoes the x-request-id it is sent,
    which another process that happens to hold the port would not.

    The probe keeps its connection open (HTTP/1.1) and closes it first, so the connection's
    TIME_WAIT stays on the probe's own port. Closed by the server (`Connection: close`), it
    sat on `port` for a minute, where Serve's direct ingress, which binds without
    SO_REUSEADDR, could not bind again: a quick restart was refused."""
    host = _LOOPBACK.get(host, host)
    token = uuid.uuid4().hex
    deadline = time.monotonic() + wait_s
    while True:
        conn = http.client.HTTPConnection(host, port, timeout=2)
        try:
            conn.request("GET", "/health", headers={"x-request-id": token})
            resp = conn.getresponse()
            resp.read()
            if resp.getheader("x-request-id") == token:
                return True
        except (OSError, http.client.HTTPException):
            pass
        finally:
            conn.close()
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)


def start(cfg: IrisConfig, *, num_cpus: int | None = None) -> Serving:
    """Start Ray unless connected, start Serve's HTTP side and deploy the app, printing
    progress; returns once the app runs, with where clients reach it."""
    import ray
    from ray import serve

    from deployments.app import build_app

    t0 = time.monotonic()
    local = None
    if not ray.is_initialized():
        local = init_ray(cfg, num_cpus=num_cpus, log_to_driver=True)
        say(t0, "Ray is up")
    http = cfg.http
    metrics_port = local.metrics_port if local is not None else None
    direct = http.direct_ingress and (
        (local is not None and local.direct_ingress_port == http.port)
        or http.direct_ingress_active()
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
    quiet_serve_client_log()
    serve.start(http_options={"host": http.host, "port": proxy_port})
    print(f">> deploying {cfg.app_name!r} (model {cfg.model.id!r} from {cfg.model.source})",
          flush=True)
    # Without waiting in Serve, which would block silently for the whole engine load and
    # then log "Application ... is ready at <the proxy's address>": with direct ingress,
    # not the address clients use. wait_until_running reports what is loading instead.
    serve.run_many(
        [serve.RunTarget(build_app(cfg), name=cfg.app_name, route_prefix="/")],
        wait_for_applications_running=False,
    )
    wait_until_running(cfg.app_name, startup_notes(cfg), t0)
    if direct and not _ingress_answers(http.host, http.port):
        # Serve moves an ingress replica that cannot bind its port to the next one.
        eph = ephemeral_ports()
        why = (f"; {eph.start}-{eph.stop - 1} are also the ports of outgoing connections, "
               f"one may have taken it: choose a port below {eph.start}"
               if http.port in eph else "")
        print(f">> ChatIngress could not take {http.host}:{http.port} (in use?{why}); clients "
              f"reach Iris through Serve's proxy on port {proxy_port} instead", flush=True)
        return Serving(proxy_port, metrics_port)
    if not direct and not _ingress_answers(http.host, proxy_port, wait_s=30.0):
        print(f">> Serve's proxy on {http.host}:{proxy_port} does not answer yet", flush=True)
    return Serving(http.port, metrics_port)


def stop_serve(timeout_s: float = 60.0) -> None:
    """serve.shutdown(), without the line it ends with: `Task ServeController.graceful_shutdown
    failed. There are infinite retries remaining...`. serve.shutdown waits on a call to the
    controller that only ends when the controller, done stopping every replica and proxy,
    kills itself; the controller actor retries its calls forever (max_task_retries=-1),
    so Ray reports that expected end as a failed call it will retry. The same wait, on a
    call that is not retried: it ends the same way, silently."""
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    try:
        controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    except ValueError:
        return  # Serve is not running
    try:
        ray.get(controller.graceful_shutdown.options(max_task_retries=0).remote(),
                timeout=timeout_s)
    except ray.exceptions.RayActorError:
        pass  # the controller exited: everything Serve ran is stopped
    except ray.exceptions.GetTimeoutError:
        print(f">> Serve did not stop within {timeout_s:.0f} s; stopping Ray anyway",
              flush=True)


def stop() -> None:
    """Serve first (replicas stop gracefully, the engine with them), then Ray."""
    import ray

    if ray.is_initialized():
        stop_serve()
        ray.shutdown()


def main() -> int:
    try:
        cfg = load_config()
    except ConfigError as exc:
        print(f">> {exc}", file=sys.stderr, flush=True)
        return 2
    stopping = False

    def _stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    # SIGTERM while starting stops like Ctrl-C, not by killing this process mid-way.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    t0 = time.monotonic()
    code = 0
    try:
        with watching_output() as streams:
            serving = start(cfg)
            settle(streams)
            signal.signal(signal.SIGINT, _stop)
            signal.signal(signal.SIGTERM, _stop)
            if serving.metrics_port is not None:
                print(f">> metrics (Prometheus): "
                      f"http://{cfg.http.host}:{serving.metrics_port}/metrics",
                      flush=True)
            served = "; ".join(
                ([f"model {cfg.model.id!r}"] if cfg.serve_chat else [])
                + ([f"encoder {cfg.encoder.id!r}"] if cfg.encoder is not None else []))
            print(f">> ready in {time.monotonic() - t0:.0f} s: OpenAI API at "
                  f"http://{cfg.http.host}:{serving.port}/v1 ({served}). "
                  "Ctrl-C stops everything.", flush=True)
        while not stopping:
            time.sleep(0.5)
    except PortInUse as exc:
        print(f">> {exc}", file=sys.stderr, flush=True)
        return 1
    except (ConfigError, DeployFailed) as exc:
        print(f">> {exc}", file=sys.stderr, flush=True)
        code = 2 if isinstance(exc, ConfigError) else 1
    except KeyboardInterrupt:
        code = 130
    # Ctrl-C again while stopping changes nothing: stopping goes on, with no traceback.
    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    print(">> stopping", flush=True)
    stop()
    print(">> stopped", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
