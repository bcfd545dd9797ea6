"""Real servers on loopback for tests: a scriptable HTTP image server and moto's S3."""

from __future__ import annotations

import datetime
import ipaddress
import random
import socket
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from deployments.run import ephemeral_ports

Route = Callable[[BaseHTTPRequestHandler], None]


_handed_out: set[int] = set()
# Ray's workers listen on 10002-19999 by default (min/max_worker_port).
_LOWEST_PORT = 20000


def free_port() -> int:
    """A free TCP port on loopback (for servers the tests and load tests start), never one
    this process was given before.

    Below the kernel's ephemeral range: a port from that range can be taken, between this
    call and the server's bind, by any outgoing connection on the machine, and Ray and vLLM
    open hundreds while an app starts (a direct ingress that binds a minute later then finds
    it in use; CI saw it). Never one handed out before: a test that takes several (a Ray head
    takes eleven) would otherwise start two servers on one."""
    top = max(ephemeral_ports().start, _LOWEST_PORT + 1000)
    while True:
        port = random.randrange(_LOWEST_PORT, top)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                # Without SO_REUSEADDR: a port still in TIME_WAIT is skipped too.
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port


class ImageServer:
    """Serves bytes (or scripted behaviours) on 127.0.0.1 and counts requests per path.

    With `tls` (an SSLContext), it speaks HTTPS and records the SNI names it was sent.
    """

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.routes: dict[str, Route] = {}
        self.hits: Counter[str] = Counter()
        self.hosts: list[str] = []  # Host header of every request
        self.sni: list[str | None] = []
        self.sent: Counter[str] = Counter()  # body bytes written, for streaming routes
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                outer.hits[path] += 1
                outer.hosts.append(self.headers.get("Host", ""))
                route = outer.routes.get(path)
                if route is None:
                    self.send_error(404)
                    return
                route(self)

            def log_message(self, *args: Any) -> None:  # keep test output quiet
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.scheme = "http"
        if tls is not None:

            def remember_sni(sock: Any, name: str | None, ctx: Any) -> None:
                outer.sni.append(name)

            tls.sni_callback = remember_sni
            self._httpd.socket = tls.wrap_socket(self._httpd.socket, server_side=True)
            self.scheme = "https"
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()

    def url(self, path: str) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}{path}"

    def add_bytes(
        self,
        path: str,
        data: bytes,
        content_type: str = "image/png",
        headers: dict[str, str] | None = None,
    ) -> str:
        def route(h: BaseHTTPRequestHandler) -> None:
            h.send_response(200)
            h.send_header("Content-Type", content_type)
            h.send_header("Content-Length", str(len(data)))
            for name, value in (headers or {}).items():
                h.send_header(name, value)
            h.end_headers()
            h.wfile.write(data)

        self.routes[path] = route
        return self.url(path)

    def add_redirect(self, path: str, location: str, status: int = 302) -> str:
        def route(h: BaseHTTPRequestHandler) -> None:
            h.send_response(status)
            h.send_header("Location", location)
            h.send_header("Content-Length", "0")
            h.end_headers()

        self.routes[path] = route
        return self.url(path)

    def add_trickle(self, path: str, data: bytes, delay_s: float) -> str:
        def route(h: BaseHTTPRequestHandler) -> None:
            h.send_response(200)
            h.send_header("Content-Length", str(len(data)))
            h.end_headers()
            try:
                for i in range(0, len(data), 64):
                    h.wfile.write(data[i : i + 64])
                    h.wfile.flush()
                    time.sleep(delay_s)
            except (BrokenPipeError, ConnectionResetError):
                pass

        self.routes[path] = route
        return self.url(path)

    def add_lying_length(self, path: str, data: bytes, declared: int) -> str:
        def route(h: BaseHTTPRequestHandler) -> None:
            h.send_response(200)
            h.send_header("Content-Length", str(declared))
            h.send_header("Connection", "close")
            h.end_headers()
            try:
                h.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                pass
            h.close_connection = True

        self.routes[path] = route
        return self.url(path)

    def add_status(self, path: str, status: int) -> str:
        def route(h: BaseHTTPRequestHandler) -> None:
            h.send_response(status)
            h.send_header("Content-Length", "0")
            h.end_headers()

        self.routes[path] = route
        return self.url(path)

    def add_stream(self, path: str, head: bytes, total: int, chunk: int = 64 << 10) -> str:
        """`head` then zeros up to `total` bytes, with no Content-Length (close-delimited)."""

        def route(h: BaseHTTPRequestHandler) -> None:
            h.send_response(200)
            h.send_header("Connection", "close")
            h.end_headers()
            h.close_connection = True
            try:
                h.wfile.write(head)
                self.sent[path] += len(head)
                zeros = bytes(chunk)
                while self.sent[path] < total:
                    h.wfile.write(zeros)
                    self.sent[path] += chunk
            except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
                pass

        self.routes[path] = route
        return self.url(path)

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


def self_signed_tls(hostname: str, directory: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server context, client context trusting it) for a certificate naming `hostname`
    (a DNS name or an IP address), written to `directory` as cert.pem and key.pem."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    try:
        san: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(hostname))
    except ValueError:
        san = x509.DNSName(hostname)
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([san]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_pem = directory / "cert.pem"
    key_pem = directory / "key.pem"
    cert_pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_pem.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert_pem, key_pem)
    client = ssl.create_default_context(cafile=str(cert_pem))
    return server, client


class S3Server:
    """moto's S3 (real S3 protocol over HTTP) on 127.0.0.1."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        self.env = {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def client(self) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        )

    def put(self, bucket: str, key: str, data: bytes) -> str:
        c = self.client()
        try:
            c.create_bucket(Bucket=bucket)
        except c.exceptions.BucketAlreadyOwnedByYou:
            pass
        c.put_object(Bucket=bucket, Key=key, Body=data)
        return f"s3://{bucket}/{key}"

    def close(self) -> None:
        self._server.stop()


class HangingS3Proxy:
    """An S3 endpoint on 127.0.0.1 that forwards to a real one (moto), except GETs of objects
    in `hung_bucket`: those get their headers and first bytes, then nothing until `release()`.
    Counts the requests it is holding."""

    def __init__(self, upstream: str, hung_bucket: str) -> None:
        import http.client
        import urllib.parse

        self.hung_bucket = hung_bucket
        self.holding = 0
        self._released = threading.Event()
        self._lock = threading.Lock()
        target = urllib.parse.urlsplit(upstream)
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                conn = http.client.HTTPConnection(target.hostname, target.port, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                headers["Host"] = target.netloc
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                conn.close()

            def _hang(self) -> None:
                with outer._lock:
                    outer.holding += 1
                try:
                    self.send_response(200)
                    self.send_header("Content-Length", "100000")
                    self.send_header("Content-Type", "image/png")
                    self.send_header("ETag", '"hung"')
                    self.end_headers()
                    self.wfile.write(b"\x89PNG\r\n\x1a\n")
                    self.wfile.flush()
                    outer._released.wait(120)
                except (BrokenPipeError, ConnectionResetError):
                    pass
                finally:
                    with outer._lock:
                        outer.holding -= 1
                    self.close_connection = True

            def do_GET(self) -> None:
                bucket = self.path.lstrip("/").split("/", 1)[0].split("?", 1)[0]
                if bucket == outer.hung_bucket and "/" in self.path.lstrip("/"):
                    self._hang()
                else:
                    self._forward()

            do_HEAD = do_PUT = do_POST = do_DELETE = _forward

            def log_message(self, *args: Any) -> None:
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()

    def release(self) -> None:
        self._released.set()

    def close(self) -> None:
        self.release()
        self._httpd.shutdown()
        self._httpd.server_close()
