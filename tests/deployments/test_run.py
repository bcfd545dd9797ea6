"""`deployments.run`: the ports `make serve` promises clients (ray.init faked; no Ray)."""

from __future__ import annotations

import socket
from http.server import BaseHTTPRequestHandler

import pytest

from deployments.run import PortInUse, _ingress_answers, init_ray
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
    return IrisConfig(http={"port": port, "proxy_port": proxy_port, "direct_ingress": True})


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
