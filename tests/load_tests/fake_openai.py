"""A fake OpenAI-compatible chat server on loopback, for testing the benchmark client without a
model: streamed answers with usage (cached tokens from a toy prefix cache), and vLLM's cache
counters on a Prometheus page, named as vLLM's server names them or as Ray's metrics agent
re-exports them, optionally published late (as Ray's agent does, every few seconds).

In-process: `FakeOpenAI()`; as a process (for the CPU meter): `python -m
tests.load_tests.fake_openai --port P [--ray] [--interval S] [--cpu-ms MS]`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

IMAGE_TOKENS, TEXT_TOKENS = 100, 10  # the toy tokenizer: per image part, per message


def tokens(message: dict[str, Any]) -> int:
    content = message.get("content")
    parts = content if isinstance(content, list) else []
    return TEXT_TOKENS + IMAGE_TOKENS * sum(p.get("type") == "image_url" for p in parts)


class FakeOpenAI:
    def __init__(self, port: int = 0, ray_names: bool = False, interval_s: float = 0.0,
                 cpu_ms: float = 0.0) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.arrivals: list[float] = []  # time.perf_counter() of each request's arrival
        self.counters = dict.fromkeys(("prefix_cache_queries", "prefix_cache_hits",
                                       "mm_cache_queries", "mm_cache_hits",
                                       "request_success"), 0)
        self._published = dict(self.counters)
        self._prefixes: set[str] = set()
        self._images: set[str] = set()
        self._lock = threading.Lock()
        self._ray = ray_names
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                if self.path == "/v1/models":
                    self._send(200, b'{"data": [{"id": "m"}]}', "application/json")
                elif self.path == "/metrics":
                    self._send(200, outer.metrics().encode(), "text/plain")
                else:
                    self._send(404, b"{}", "application/json")

            def do_POST(self) -> None:
                arrived = time.perf_counter()
                outer.burn()
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path.endswith("/embeddings"):
                    with outer._lock:
                        outer.bodies.append(body)
                    self._send(200, json.dumps({"data": [{"index": 0, "embedding": [0.6, 0.8]}],
                                                "usage": {"prompt_tokens": 1}}).encode(),
                               "application/json")
                    return
                answer = outer.answer(body, arrived)
                self._send(200, answer, "text/event-stream")

            def _send(self, status: int, data: bytes, kind: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self._stop = threading.Event()
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        if interval_s:
            threading.Thread(target=self._publish, args=(interval_s,), daemon=True).start()
        self._interval = interval_s
        self._cpu_s = cpu_ms / 1000

    def burn(self) -> None:
        """Spend the configured CPU time on this request: a real server's work, which the CPU
        meter must see (too little and the kernel's 10 ms ticks may count none of it)."""
        end = time.thread_time() + self._cpu_s
        while time.thread_time() < end:
            pass

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def _publish(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            with self._lock:
                self._published = dict(self.counters)

    def answer(self, body: dict[str, Any], arrived: float) -> bytes:
        messages = body["messages"]
        with self._lock:
            self.bodies.append(body)
            self.arrivals.append(arrived)
            n = len(self.bodies)
            # The prefix cache: the longest run of leading messages seen in an earlier prompt.
            keys = [json.dumps(messages[:i + 1]) for i in range(len(messages))]
            hit = max((i + 1 for i, k in enumerate(keys) if k in self._prefixes), default=0)
            cached = sum(tokens(m) for m in messages[:hit])
            prompt = sum(tokens(m) for m in messages)
            self._prefixes.update(keys)
            urls = [p["image_url"]["url"] for m in messages if isinstance(m["content"], list)
                    for p in m["content"] if p.get("type") == "image_url"]
            digests = [hashlib.sha256(u.encode()).hexdigest() for u in urls]
            c = self.counters
            c["prefix_cache_queries"] += prompt
            c["prefix_cache_hits"] += cached
            c["mm_cache_queries"] += len(digests)
            c["mm_cache_hits"] += sum(d in self._images for d in digests)
            self._images.update(digests)
            c["request_success"] += 1
            if not self._interval:
                self._published = dict(c)
        chunks = [{"choices": [{"delta": {"role": "assistant"}}]},
                  {"choices": [{"delta": {"content": f"answer {n}"}}]},
                  {"choices": [], "usage": {"prompt_tokens": prompt, "completion_tokens": 2,
                                            "prompt_tokens_details": {"cached_tokens": cached}}}]
        return b"".join(b"data: " + json.dumps(ch).encode() + b"\n\n" for ch in chunks) + \
            b"data: [DONE]\n\n"

    def metrics(self) -> str:
        with self._lock:
            published = dict(self._published)
        lines = []
        for name, value in published.items():
            full = f"ray_vllm_{name}_total" if self._ray else f"vllm:{name}_total"
            lines += [f"# TYPE {full} counter",
                      f'{full}{{engine="0",model_name="m"}} {float(value)}',
                      # Samples other than the totals must be left alone.
                      f'{full.removesuffix("_total")}_created{{engine="0"}} 1.7e9']
        return "\n".join(lines) + "\n"

    def close(self) -> None:
        self._stop.set()
        self._httpd.shutdown()
        self._httpd.server_close()


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--ray", action="store_true", help="name the counters as Ray exports them")
    p.add_argument("--interval", type=float, default=0.0, help="publish counters this often")
    p.add_argument("--cpu-ms", type=float, default=0.0, help="CPU time spent on each request")
    args = p.parse_args()
    server = FakeOpenAI(args.port, args.ray, args.interval, args.cpu_ms)
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        server.close()
