"""Locust: /v1/chat/completions with a mix of images and sources, streaming, TTFT recorded.

    .venv/bin/locust -f load_tests/locustfile.py --host http://127.0.0.1:8000 \\
        --headless -u 8 -r 2 -t 2m [--tags fresh chat]

Tasks, by tag (`--tags` runs only some, `--exclude-tags` leaves some out):
    fresh           "fresh-small": a distinct 640x480 photo-like JPEG on every request;
                    "fresh-12mp": a distinct 4000x3000 one. Nothing for a server to reuse.
    chat            "chat-4turns turn N": a conversation of 4 turns whose first user message
                    holds a distinct 1280x960 JPEG; every turn re-sends the whole history (the
                    answers as streamed, then a new question), as chat clients do. One sample
                    per turn, so the first turn and the ones a prefix cache can help sit apart.
    cache-friendly  the same few images again and again (small and 12 MP JPEGs, a PNG) via
                    data:, http: and (see below) https: and s3: URLs.
    distinct        small never-seen pattern images, made on the spot.
The distinct images of "fresh" and "chat" are made before the clock: a pool of each is made at
start (each image used once, bodies encoded once), distinct across the whole run and across
runs (a random salt). When a pool runs out, more are made on the spot, cheaply (a seeded
shift, mirror and noise patch of a photo-like base: ~0.2 s for 12 MP), outside the request's
timing but blocking this Locust process meanwhile: size the pool to the run.

Environment (not IRIS_*: Iris refuses IRIS_* variables that name no setting, and these
often share a shell with `make serve`):
    LOCUST_API_KEY            bearer key, if the server wants one
    LOCUST_MODEL              model id (default demo-vlm)
    LOCUST_FRESH_POOL         how many of each fresh kind (640x480 requests, 4000x3000
                              requests, conversations) to make before the run (default 16;
                              a 4000x3000 body is ~9 MB of memory)
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
from collections import deque
from pathlib import Path
from typing import Any

from locust import HttpUser, between, events, tag, task

from load_tests.workload import Conversation, Images, chat_body, encoded
from tests.images import data_uri, encode, natural, pattern
from tests.servers import ImageServer, self_signed_tls

MODEL = os.environ.get("LOCUST_MODEL", "demo-vlm")
MAX_TOKENS = 8
_IMAGES: dict[str, list[tuple[str, str]]] = {}  # kind -> [(source, url)]
_SERVERS: list[ImageServer] = []
# The distinct-image tasks: sizes, and what was made before the run (each used once).
FRESH = {"fresh-small": (640, 480), "fresh-12mp": (4000, 3000), "chat-4turns": (1280, 960)}
_POOLS: dict[str, deque[bytes | Conversation]] = {k: deque() for k in FRESH}
# One base per size: a 4000x3000 base takes seconds, and shifts make every image distinct.
_FACTORY = Images(bases=1)


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


def fresh(kind: str) -> bytes | Conversation:
    """A request body (or, for chat-4turns, a conversation) with an image never sent before."""
    w, h = FRESH[kind]
    uri = _FACTORY.data_uri(w, h)
    if kind == "chat-4turns":
        return Conversation.start(MODEL, uri, MAX_TOKENS)
    return encoded(chat_body(MODEL, uri, MAX_TOKENS))


def take(kind: str) -> bytes | Conversation:
    pool = _POOLS[kind]
    return pool.popleft() if pool else fresh(kind)


def _wanted(environment: Any, tag_: str) -> bool:
    """Whether --tags/--exclude-tags leave tasks tagged `tag_` in: no pool for the others."""
    opts = getattr(environment, "parsed_options", None)
    tags, exclude = getattr(opts, "tags", None), getattr(opts, "exclude_tags", None)
    return (not tags or tag_ in tags) and not (exclude and tag_ in exclude)


def fill_pools(size: int, kinds: list[str]) -> float:
    """Make `size` of each fresh kind; the seconds it took."""
    t0 = time.perf_counter()
    for kind in kinds:
        _POOLS[kind].extend(fresh(kind) for _ in range(size))
    return time.perf_counter() - t0


@events.test_start.add_listener
def _setup(environment: Any, **_: Any) -> None:
    kinds = [k for k in FRESH if _wanted(environment, "chat" if k.startswith("chat")
                                         else "fresh")]
    size = int(os.environ.get("LOCUST_FRESH_POOL", "16"))
    took = fill_pools(size, kinds)
    print(f"made {size} of each of {', '.join(kinds) or 'no fresh kind'} in {took:.1f} s",
          file=sys.stderr, flush=True)
    http = ImageServer()
    _SERVERS.append(http)
    https = None
    tls_dir = os.environ.get("LOCUST_TLS_DIR")
    if tls_dir:
        https = ImageServer(tls=tls_server_context(Path(tls_dir)))
        _SERVERS.append(https)
    # A 12 MP photo-like image takes seconds to make, and Locust's run time counts it.
    images = _make_images() if _wanted(environment, "cache-friendly") else {}
    print(f"cache-friendly images: {len(images)}", file=sys.stderr, flush=True)
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
        self._send(name, encoded(chat_body(MODEL, url, MAX_TOKENS)))

    def _send(self, name: str, body: bytes) -> str | None:
        """One streamed request, sampled as `name`; the answer's text, None if it failed."""
        t0 = time.perf_counter()
        ttft: float | None = None
        text = ""
        with self.client.post("/v1/chat/completions", data=body, stream=True, name=name,
                              headers={"Content-Type": "application/json"},
                              catch_response=True) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}")
                return None
            size = 0
            for line in resp.iter_lines():
                size += len(line) + 1
                if not line.startswith(b"data: {"):
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    resp.failure(str(chunk["error"])[:200])
                    return None
                for choice in chunk.get("choices") or []:
                    piece = (choice.get("delta") or {}).get("content")
                    if piece:
                        text += piece
                        if ttft is None:
                            ttft = time.perf_counter() - t0
            # Locust's own clock stopped at the headers; the sample is the whole stream.
            resp.request_meta["response_time"] = (time.perf_counter() - t0) * 1000
            resp.request_meta["response_length"] = size
            resp.success()
        if ttft is not None:
            events.request.fire(request_type="TTFT", name=name, response_time=ttft * 1000,
                                response_length=0, exception=None, context={})
        return text

    @tag("cache-friendly")
    @task(6)
    def small_repeated(self) -> None:
        self._chat("small-jpeg")

    @tag("cache-friendly")
    @task(2)
    def png_repeated(self) -> None:
        self._chat("png")

    @tag("cache-friendly")
    @task(1)
    def large_repeated(self) -> None:
        self._chat("large-jpeg")

    @tag("distinct")
    @task(2)
    def small_distinct(self) -> None:
        self._chat("small-jpeg", distinct=True)

    @tag("fresh")
    @task(6)
    def fresh_small(self) -> None:
        body = take("fresh-small")
        assert isinstance(body, bytes)
        self._send("fresh-small", body)

    @tag("fresh")
    @task(1)
    def fresh_12mp(self) -> None:
        body = take("fresh-12mp")
        assert isinstance(body, bytes)
        self._send("fresh-12mp", body)

    @tag("chat")
    @task(2)
    def chat_4turns(self) -> None:
        conv = take("chat-4turns")
        assert isinstance(conv, Conversation)
        replies: list[str] = []
        for turn in range(1, conv.turns + 1):
            reply = self._send(f"chat-4turns turn {turn}", conv.body(replies))
            if reply is None:
                return
            replies.append(reply)


if __name__ == "__main__":  # python -m load_tests.locustfile DIR: make the https test CA
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else "load_tests/results/locust-tls")
    tls_server_context(folder)
    print(f"CA for https://127.0.0.1 images: {folder / 'cert.pem'}; start Iris with "
          f"IRIS_FETCH__CA_BUNDLE={folder.resolve() / 'cert.pem'}")
