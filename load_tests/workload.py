"""A bounded, concurrent streaming-chat workload against any OpenAI-compatible server,
recording time to first token and end-to-end latency per request."""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import httpx


@dataclass(frozen=True)
class Workload:
    name: str
    image_urls: tuple[str, ...]  # cycled through; one entry = the same image every request
    concurrency: int = 4
    requests: int = 40
    max_tokens: int = 8


@dataclass
class Result:
    workload: str
    target: str
    wall_s: float = 0.0
    ttft_s: list[float] = field(default_factory=list)
    e2e_s: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> int:
        return len(self.e2e_s)

    @property
    def throughput(self) -> float:
        return self.ok / self.wall_s if self.wall_s else 0.0

    def pct(self, values: list[float], p: float) -> float:
        if not values:
            return float("nan")
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]

    def summary(self) -> dict[str, Any]:
        return {
            "workload": self.workload, "target": self.target, "requests": self.ok,
            "errors": len(self.errors), "req_per_s": round(self.throughput, 2),
            "ttft_p50_ms": round(self.pct(self.ttft_s, 50) * 1000, 1),
            "ttft_p99_ms": round(self.pct(self.ttft_s, 99) * 1000, 1),
            "e2e_p50_ms": round(self.pct(self.e2e_s, 50) * 1000, 1),
            "e2e_mean_ms": round(statistics.fmean(self.e2e_s) * 1000, 1) if self.e2e_s else None,
        }


def chat_body(model: str, image_url: str, max_tokens: int) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": image_url}},
            {"type": "text", "text": "Describe this image."},
        ]}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        # Every server generates exactly max_tokens, whatever the random model says.
        "ignore_eos": True,
    }


@dataclass
class StreamResult:
    ok: bool
    first_chunk_s: float | None = None
    first_token_s: float | None = None
    e2e_s: float | None = None
    error: str = ""


def encoded(body: dict[str, Any]) -> bytes:
    """The request body as sent. Encode once per distinct body: re-serialising a 9 MB data: URI
    costs the client ~21 ms per request, CPU it takes from the server under test."""
    return json.dumps(body).encode()


async def stream_chat(client: httpx.AsyncClient, url: str,
                      body: dict[str, Any] | bytes) -> StreamResult:
    """One streaming chat request; any non-200, error event or missing [DONE] fails it."""
    t0 = time.monotonic()
    res = StreamResult(ok=False)
    content = body if isinstance(body, bytes) else encoded(body)
    try:
        async with client.stream("POST", url, content=content,
                                 headers={"Content-Type": "application/json"}) as resp:
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")[:200]
                res.error = f"HTTP {resp.status_code}: {text}"
                return res
            done = False
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: "):]
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    res.error = f"stream error: {chunk['error'].get('message')}"
                    return res
                now = time.monotonic() - t0
                if res.first_chunk_s is None:
                    res.first_chunk_s = now
                choices = chunk.get("choices") or [{}]
                if res.first_token_s is None and (choices[0].get("delta") or {}).get("content"):
                    res.first_token_s = now
            if not done:
                res.error = "stream ended without [DONE]"
                return res
            res.ok = True
            res.e2e_s = time.monotonic() - t0
            return res
    except Exception as exc:
        res.error = f"{type(exc).__name__}: {exc}"[:300]
        return res


async def one_request(client: httpx.AsyncClient, url: str, body: dict[str, Any] | bytes,
                      result: Result) -> None:
    res = await stream_chat(client, url, body)
    if not res.ok:
        result.errors.append(res.error)
        return
    assert res.e2e_s is not None
    result.e2e_s.append(res.e2e_s)
    result.ttft_s.append(res.first_token_s if res.first_token_s is not None else res.e2e_s)


async def run_workload(base_url: str, model: str, workload: Workload, target: str,
                       api_key: str | None = None, timeout_s: float = 600) -> Result:
    result = Result(workload.name, target)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    sem = asyncio.Semaphore(workload.concurrency)
    url = f"{base_url}/chat/completions"
    limits = httpx.Limits(max_connections=workload.concurrency * 2)
    bodies = {url_: encoded(chat_body(model, url_, workload.max_tokens))
              for url_ in dict.fromkeys(workload.image_urls)}
    async with httpx.AsyncClient(timeout=timeout_s, headers=headers, limits=limits) as client:

        async def bounded(i: int) -> None:
            image = workload.image_urls[i % len(workload.image_urls)]
            async with sem:
                await one_request(client, url, bodies[image], result)

        t0 = time.perf_counter()
        await asyncio.wait_for(
            asyncio.gather(*(bounded(i) for i in range(workload.requests))), timeout_s
        )
        result.wall_s = time.perf_counter() - t0
    return result
