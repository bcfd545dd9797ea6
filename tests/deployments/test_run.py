"""`deployments.run`: the ports `make serve` promises clients (ray.init faked; no Ray)."""

from __future__ import annotations

import os
import socket
import threading
from http.server import BaseHTTPRequestHandler
from wsgiref.simple_server import make_server

import pytest

from deployments.run import (
    RAY_TUNING_ENV,
    SLOW_STARTUP_ENV,
    SLOW_STARTUP_S,
    PortInUse,
    _ingress_answers,
    ephemeral_ports,
    holding,
    init_ray,
)
from handlers.config import IrisConfig
from tests.servers import ImageServer, Route, free_port


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _config(port: int, proxy_port: int | None = None) -> IrisConfig:
    # A free metrics port: init_ray holds it too, and the default (8080) may be taken here.
    return IrisConfig(
        http={"port": port, "proxy_port": proxy_port, "direct_ingress": True},
        metrics_port=free_port(),
    )


def test_init_ray_holds_the_client_ports_while_ray_starts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Ray's processes pick free ports as they start; one once took the port clients were
    told, and the ingress silently moved to the next one."""
    import ray

    port, proxy_port = free_port(), free_port()
    seen: dict[int, bool] = {}

    def fake_init(**_: object) -> None:
        seen.update({p: _bindable(p) for p in (port, proxy_port)})

    monkeypatch.setattr(ray, "init", fake_init)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    init_ray(_config(port, proxy_port))
    assert seen == {port: False, proxy_port: False}
    assert _bindable(port) and _bindable(proxy_port)  # free again for Serve to take


def test_init_ray_refuses_a_port_in_use_before_starting_ray(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import ray

    started: list[bool] = []
    monkeypatch.setattr(ray, "init", lambda **_: started.append(True))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(PortInUse, match=f"127.0.0.1:{port} is in use"):
            init_ray(_config(port))
    assert started == []


def test_init_ray_lets_rays_metrics_agent_take_its_port(monkeypatch: pytest.MonkeyPatch) -> None:
    """The metrics port is held while Ray starts, and Ray's metrics agent binds it then (on
    all addresses, SO_REUSEADDR): a plain hold made the agent fail, and the raylet with it
    ("The current node timed out during startup")."""
    import ray

    cfg = _config(free_port(), free_port())
    seen: dict[str, object] = {}

    def fake_init(**kwargs: object) -> None:
        seen.update(kwargs)
        seen["slow_startup"] = os.environ.get(SLOW_STARTUP_ENV)
        server = make_server("", cfg.metrics_port, lambda env, start: [])  # as the agent does
        server.server_close()

    monkeypatch.setattr(ray, "init", fake_init)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv(SLOW_STARTUP_ENV, raising=False)
    init_ray(cfg)
    assert seen["_metrics_export_port"] == cfg.metrics_port
    # A new instance of its own, even if `ray start` left another cluster's address behind.
    assert seen["address"] == "local"
    # Serve's controller inherits a slow-startup warning past what the engine takes to load.
    assert seen["slow_startup"] == str(SLOW_STARTUP_S)
    assert SLOW_STARTUP_ENV not in os.environ


def test_ray_starts_with_irises_settings_unless_the_environment_has_its_own(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Ray's processes read these when they start, from the environment they inherit; a
    value the user exported (to measure Ray's defaults, say) is left as it is."""
    import ray

    seen: dict[str, str | None] = {}
    monkeypatch.setattr(ray, "init", lambda **_: seen.update(
        {k: os.environ.get(k) for k in RAY_TUNING_ENV}))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    for key in RAY_TUNING_ENV:
        monkeypatch.delenv(key, raising=False)
    theirs = next(iter(RAY_TUNING_ENV))
    monkeypatch.setenv(theirs, "1")
    init_ray(_config(free_port()))
    assert seen == {**RAY_TUNING_ENV, theirs: "1"}
    assert {k: os.environ.get(k) for k in RAY_TUNING_ENV} == {
        **dict.fromkeys(RAY_TUNING_ENV), theirs: "1"}  # the driver's own is as it was


def _time_wait_port(server_reuses_addr: bool) -> int:
    """A loopback port whose only socket is a connection in TIME_WAIT on the server side,
    as a client the server closed on leaves behind."""
    with socket.socket() as server:
        if server_reuses_addr:
            server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        accepted, _ = server.accept()
        accepted.close()  # the server side closes first: its end goes to TIME_WAIT
        client.close()
    return int(port)


# Serve's direct ingress binds without SO_REUSEADDR (its TIME_WAIT then blocks every bind,
# even one with it); Ray's metrics agent and most servers bind with it.
@pytest.mark.parametrize("server_reuses_addr", [False, True])
def test_holding_takes_a_port_left_in_time_wait(server_reuses_addr: bool) -> None:
    """A restart right after Ctrl-C was refused: "127.0.0.1:8000 is in use by another
    process" with nothing listening, only the last run's probe connection in TIME_WAIT."""
    port = _time_wait_port(server_reuses_addr)
    assert not _bindable(port)  # what refused the restart: the TIME_WAIT connection
    with holding("127.0.0.1", [port]):
        pass


def test_holding_still_refuses_a_port_something_listens_on() -> None:
    with socket.socket() as live:
        live.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        live.bind(("127.0.0.1", 0))
        live.listen()
        port = live.getsockname()[1]
        with pytest.raises(PortInUse, match=f"127.0.0.1:{port} is in use"):
            with holding("127.0.0.1", [free_port(), port]):
                pass


def _health(echo: bool) -> Route:
    def route(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        if echo:
            h.send_header("x-request-id", h.headers.get("x-request-id", ""))
        h.send_header("Content-Length", "2")
        h.end_headers()
        h.wfile.write(b"{}")

    return route


@pytest.mark.parametrize(("echo", "expected"), [(True, True), (False, False)])
def test_ingress_answers_only_if_it_echoes_the_probe_id(echo: bool, expected: bool) -> None:
    server = ImageServer()
    try:
        server.routes["/health"] = _health(echo)
        assert _ingress_answers("127.0.0.1", server.port, wait_s=0.2) is expected
    finally:
        server.close()


def test_ingress_answers_false_when_nothing_listens() -> None:
    assert _ingress_answers("127.0.0.1", free_port(), wait_s=0.2) is False


def test_ingress_probe_leaves_no_time_wait_on_the_ingress_port() -> None:
    """The probe closes its connection first, so a restart finds the port free, even for
    a server that binds without SO_REUSEADDR (Serve's direct ingress, HTTP/1.1)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    closed_first: list[str] = []

    def serve_one() -> None:
        conn, _ = listener.accept()
        with conn:
            request = b""
            while b"\r\n\r\n" not in request:
                request += conn.recv(4096)
            rid = next(line.split(b":", 1)[1].strip() for line in request.split(b"\r\n")
                       if line.lower().startswith(b"x-request-id:"))
            conn.sendall(b"HTTP/1.1 200 OK\r\nx-request-id: " + rid
                         + b"\r\nContent-Length: 2\r\n\r\n{}")
            if b"connection: close" in request.lower():
                closed_first.append("server")  # as uvicorn does: its end goes to TIME_WAIT
                return
            while conn.recv(4096):  # keep-alive: the server waits for the client to close
                pass
            closed_first.append("client")

    thread = threading.Thread(target=serve_one, daemon=True)
    thread.start()
    try:
        assert _ingress_answers("127.0.0.1", port, wait_s=5) is True
        thread.join(10)
    finally:
        listener.close()
    assert not thread.is_alive()
    assert closed_first == ["client"]
    assert _bindable(port)


def test_test_servers_get_ports_that_outgoing_connections_never_take() -> None:
    """A port from the range the kernel picks outgoing connections' ports from can be taken
    by one between free_port() and a server's bind a minute later (make serve's test saw
    its direct ingress refused so)."""
    with socket.create_server(("127.0.0.1", 0)) as listener, socket.create_connection(
        listener.getsockname()
    ) as outgoing:
        assert outgoing.getsockname()[1] in ephemeral_ports()
    ports = [free_port() for _ in range(200)]
    assert not [p for p in ports if p in ephemeral_ports()]
    assert len(set(ports)) == len(ports)
