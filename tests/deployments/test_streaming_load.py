"""Streaming under stress: client disconnects cancel engine work; overload is refused fast."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
import pytest

from tests.conftest import LLM_MAX_ONGOING, LLM_MAX_QUEUED
from tests.deployments.test_api_contract import AUTH, good_body


# ChatIngress reports the engine's load in either layout (its own engine, or LLMServer's).
def engine_unfinished(app_name: str) -> int:
    from ray import serve

    handle = serve.get_deployment_handle("ChatIngress", app_name)
    return int(handle.stats.remote().result()["unfinished_requests"])


async def engine_unfinished_async(app_name: str) -> int:
    from ray import serve

    handle = serve.get_deployment_handle("ChatIngress", app_name)
    return int((await handle.stats.remote())["unfinished_requests"])


def long_stream_body(tokens: int) -> dict[str, Any]:
    # ignore_eos keeps the random demo model generating for exactly `tokens` tokens.
    return good_body(max_tokens=tokens, stream=True, ignore_eos=True)


def wait_idle(app_name: str, timeout_s: float = 30) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if engine_unfinished(app_name) == 0:
            return time.monotonic() - t0
        time.sleep(0.1)
    raise AssertionError("engine still has unfinished requests")


def test_disconnect_mid_stream_aborts_the_engine_request(iris: str, iris_config) -> None:  # type: ignore[no-untyped-def]
    app = iris_config.app_name
    wait_idle(app)
    with httpx.stream("POST", f"{iris}/chat/completions", json=long_stream_body(3000),
                      headers=AUTH, timeout=60) as resp:
        assert resp.status_code == 200
        lines = resp.iter_lines()
        got = 0
        for line in lines:
            if line.startswith("data: {"):
                got += 1
            if got >= 3:
                break
        assert engine_unfinished(app) == 1  # still generating while we hold the stream
    # The connection is closed here, long before 3000 tokens.
    assert wait_idle(app, 30) < 30


async def test_overload_is_refused_fast_and_admitted_requests_finish(
    iris: str, iris_config  # type: ignore[no-untyped-def]
) -> None:
    for _ in range(300):
        if await engine_unfinished_async(iris_config.app_name) == 0:
            break
        await asyncio.sleep(0.1)
    flood = 4 * (LLM_MAX_ONGOING + LLM_MAX_QUEUED)
    body = {**long_stream_body(64), "stream_options": {"include_usage": True}}

    async def one(client: httpx.AsyncClient) -> tuple[int, float, str, dict[str, str]]:
        t0 = time.monotonic()
        async with client.stream("POST", f"{iris}/chat/completions",
                                 json=body, headers=AUTH) as resp:
            text = "".join([chunk async for chunk in resp.aiter_text()])
            return resp.status_code, time.monotonic() - t0, text, dict(resp.headers)

    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=flood)) as c:
        results = await asyncio.gather(*(one(c) for _ in range(flood)))

    ok = [r for r in results if r[0] == 200]
    refused = [r for r in results if r[0] != 200]
    assert refused, "nothing was refused: the queue cap is not enforced"
    assert len(ok) >= LLM_MAX_ONGOING
    for status, elapsed, text, headers in refused:
        assert status == 503 and headers.get("retry-after") == "1"
        assert json.loads(text)["error"]["type"] == "overloaded_error"
        assert elapsed < 10, f"refusal took {elapsed:.1f} s"
    for _, _, text, _ in ok:
        assert text.rstrip().endswith("data: [DONE]")
        assert '"error"' not in text
        chunks = [json.loads(ln[6:]) for ln in text.splitlines() if ln.startswith("data: {")]
        # Every token was generated. (Not one chunk per token: when the reader falls behind,
        # vLLM folds several tokens into one delta, which a loaded 2-core machine does.)
        assert chunks[-1]["usage"]["completion_tokens"] == 64
        assert sum(bool(c["choices"]) for c in chunks) >= 2


@pytest.mark.parametrize("tokens", [5])
def test_stream_format_is_openai_sse(iris: str, tokens: int) -> None:
    body = good_body(max_tokens=tokens, stream=True, stream_options={"include_usage": True},
                     ignore_eos=True)
    with httpx.stream("POST", f"{iris}/chat/completions", json=body, headers=AUTH,
                      timeout=60) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = [ln for ln in resp.iter_lines() if ln]
    assert events[-1] == "data: [DONE]"
    payloads = [json.loads(e[6:]) for e in events[:-1]]
    assert all(p["object"] == "chat.completion.chunk" for p in payloads)
    assert payloads[-1]["usage"]["completion_tokens"] == tokens
