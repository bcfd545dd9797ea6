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


async def one_request(client: httpx.AsyncClient, url: str, body: dict[str, Any],
                      result: Result) -> None:
    t0 = time.perf_counter()
    ttft: float | None = None
    try:
        async with client.stream("POST", url, json=body) as resp:
            if resp.status_code != 200:
                result.errors.append(f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}")
                return
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    result.errors.append(str(chunk["error"])[:200])
                    return
                if ttft is None and any(
                    (c.get("delta") or {}).get("content") for c in chunk.get("choices", [])
                ):
                    ttft = time.perf_counter() - t0
    except httpx.HTTPError as exc:
        result.errors.append(f"{type(exc).__name__}: {exc}"[:200])
        return
    result.e2e_s.append(time.perf_counter() - t0)
    result.ttft_s.append(ttft if ttft is not None else result.e2e_s[-1])


async def run_workload(base_url: str, model: str, workload: Workload, target: str,
                       api_key: str | None = None, timeout_s: float = 600) -> Result:
    result = Result(workload.name, target)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    sem = asyncio.Semaphore(workload.concurrency)
    url = f"{base_url}/chat/completions"
    limits = httpx.Limits(max_connections=workload.concurrency * 2)
    async with httpx.AsyncClient(timeout=timeout_s, headers=headers, limits=limits) as client:

        async def bounded(i: int) -> None:
            image = workload.image_urls[i % len(workload.image_urls)]
            async with sem:
                await one_request(client, url, chat_body(model, image, workload.max_tokens),
                                  result)

        t0 = time.perf_counter()
        await asyncio.wait_for(
            asyncio.gather(*(bounded(i) for i in range(workload.requests))), timeout_s
        )
        result.wall_s = time.perf_counter() - t0
    return result
