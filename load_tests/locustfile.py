"""Locust: /v1/chat/completions with a mix of images and sources, streaming, TTFT recorded.

    .venv/bin/locust -f load_tests/locustfile.py --host http://127.0.0.1:8000 \\
        --headless -u 8 -r 2 -t 2m

Environment (not IRIS_*: Iris refuses IRIS_* variables that name no setting, and these
often share a shell with `make serve`):
    LOCUST_API_KEY            bearer key, if the server wants one
    LOCUST_MODEL              model id (default demo-vlm)
    LOCUST_S3_ENDPOINT        an S3 endpoint the *server* also reads (e.g. a moto server
                              started with `moto_server -H 127.0.0.1 -p 5000` and Iris started
                              with AWS_ENDPOINT_URL=http://127.0.0.1:5000); images are uploaded
                              there at start and s3:// URLs join the mix. Unset: no s3.
    LOCUST_TLS_DIR            a folder holding a self-signed CA for 127.0.0.1 (made with
                              `python -m load_tests.locustfile DIR`); https:// URLs from a
                              second loopback server join the mix. Start the server under test
                              with IRIS_FETCH__CA_BUNDLE=DIR/cert.pem so it trusts them.
The http(s):// images come from loopback servers this file starts; the server under test
must allow private networks (infra/local.yaml does).

Each request is one Locust sample timed to the end of the stream (its last byte, not its
headers, which a streamed answer sends at once); time to first token is reported as a
separate "TTFT" sample with the same name, so the two sit side by side in the stats.
"""

from __future__ import annotations

import json
import os
import random
import ssl
import sys
import time
from pathlib import Path
from typing import Any

from locust import HttpUser, between, events, task

from tests.images import data_uri, encode, natural, pattern
from tests.servers import ImageServer, self_signed_tls

MODEL = os.environ.get("LOCUST_MODEL", "demo-vlm")
_IMAGES: dict[str, list[tuple[str, str]]] = {}  # kind -> [(source, url)]
_SERVERS: list[ImageServer] = []


def tls_server_context(directory: Path) -> ssl.SSLContext:
    """The loopback https server's context; the CA is made once and then reused, so the
    server under test can be started trusting it."""
    if not (directory / "cert.pem").exists():
        directory.mkdir(parents=True, exist_ok=True)
        return self_signed_tls("127.0.0.1", directory)[0]
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(directory / "cert.pem", directory / "key.pem")
    return ctx


def _make_images() -> dict[str, tuple[bytes, str]]:
    return {
        "small-jpeg": (encode(natural(640, 480, seed=1), "JPEG", quality=90), "image/jpeg"),
        "large-jpeg": (encode(natural(4000, 3000, seed=2), "JPEG", quality=90), "image/jpeg"),
        "png": (encode(pattern(800, 600, seed=3)), "image/png"),
    }


@events.test_start.add_listener
def _setup(environment: Any, **_: Any) -> None:
    http = ImageServer()
    _SERVERS.append(http)
    https = None
    tls_dir = os.environ.get("LOCUST_TLS_DIR")
    if tls_dir:
        https = ImageServer(tls=tls_server_context(Path(tls_dir)))
        _SERVERS.append(https)
    images = _make_images()
    s3 = None
    endpoint = os.environ.get("LOCUST_S3_ENDPOINT")
    if endpoint:
        import boto3

        s3 = boto3.client("s3", endpoint_url=endpoint)
        try:
            s3.create_bucket(Bucket="iris-locust")
        except Exception:  # already there
            pass
    for kind, (data, mime) in images.items():
        entries = [("data", data_uri(data, mime)),
                   ("http", http.add_bytes(f"/{kind}", data, mime))]
        if https is not None:
            entries.append(("https", https.add_bytes(f"/{kind}", data, mime)))
        if s3 is not None:
            s3.put_object(Bucket="iris-locust", Key=kind, Body=data)
            entries.append(("s3", f"s3://iris-locust/{kind}"))
        _IMAGES[kind] = entries


@events.test_stop.add_listener
def _teardown(environment: Any, **_: Any) -> None:
    for server in _SERVERS:
        server.close()


class ChatUser(HttpUser):
    wait_time = between(0.0, 0.5)

    def on_start(self) -> None:
        key = os.environ.get("LOCUST_API_KEY")
        if key:
            self.client.headers["Authorization"] = f"Bearer {key.split(',')[0]}"

    def _image(self, kind: str, distinct: bool) -> tuple[str, str]:
        source, url = random.choice(_IMAGES[kind])
        if distinct:  # a never-seen image: defeats every cache
            img = pattern(320, 240, seed=random.randrange(1 << 30))
            return "data", data_uri(encode(img, "JPEG"), "image/jpeg")
        return source, url

    def _chat(self, kind: str, distinct: bool = False) -> None:
        source, url = self._image(kind, distinct)
        name = f"{kind}{'-distinct' if distinct else ''} via {source}"
        body = {"model": MODEL, "max_tokens": 8, "stream": True, "ignore_eos": True,
                "stream_options": {"include_usage": True},
                "messages": [{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": url}},
                    {"type": "text", "text": "Describe this image."}]}]}
        t0 = time.perf_counter()
        ttft: float | None = None
        with self.client.post("/v1/chat/completions", json=body, stream=True, name=name,
                              catch_response=True) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}")
                return
            size = 0
            for line in resp.iter_lines():
                size += len(line) + 1
                if not line.startswith(b"data: {"):
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    resp.failure(str(chunk["error"])[:200])
                    return
                if ttft is None and any((c.get("delta") or {}).get("content")
                                        for c in chunk.get("choices", [])):
                    ttft = time.perf_counter() - t0
            # Locust's own clock stopped at the headers; the sample is the whole stream.
            resp.request_meta["response_time"] = (time.perf_counter() - t0) * 1000
            resp.request_meta["response_length"] = size
            resp.success()
        if ttft is not None:
            events.request.fire(request_type="TTFT", name=name, response_time=ttft * 1000,
                                response_length=0, exception=None, context={})

    @task(6)
    def small_repeated(self) -> None:
        self._chat("small-jpeg")

    @task(2)
    def png_repeated(self) -> None:
        self._chat("png")

    @task(1)
    def large_repeated(self) -> None:
        self._chat("large-jpeg")

    @task(2)
    def small_distinct(self) -> None:
        self._chat("small-jpeg", distinct=True)


if __name__ == "__main__":  # python -m load_tests.locustfile DIR: make the https test CA
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else "load_tests/results/locust-tls")
    tls_server_context(folder)
    print(f"CA for https://127.0.0.1 images: {folder / 'cert.pem'}; start Iris with "
          f"IRIS_FETCH__CA_BUNDLE={folder.resolve() / 'cert.pem'}")
