"""Streaming under stress: client disconnects cancel engine work; overload is refused at once,
before any admitted stream has finished."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from typing import Any

import httpx
import pytest

from tests.support import (
    AUTH,
    LLM_MAX_ONGOING,
    LLM_MAX_QUEUED,
    IrisApp,
    engine_unfinished,
    good_body,
)


def unfinished(app: IrisApp) -> int:
    """Requests the app's engines still hold (every engine replica's, summed)."""
    return engine_unfinished(app.config.app_name, app.engine_deployment)


def wait_idle(app: IrisApp, guard_s: float = 60) -> None:
    deadline = time.monotonic() + guard_s
    while unfinished(app) != 0:
        if time.monotonic() > deadline:
            raise AssertionError("the engine still has unfinished requests")
        time.sleep(0.1)


def long_stream_body(tokens: int) -> dict[str, Any]:
    # ignore_eos keeps the random demo model generating for exactly `tokens` tokens.
    return good_body(max_tokens=tokens, stream=True, ignore_eos=True)


def test_disconnect_mid_stream_aborts_the_engine_request(iris: str, iris_app: IrisApp) -> None:
    wait_idle(iris_app)
    with httpx.stream("POST", f"{iris}/chat/completions", json=long_stream_body(3000),
                      headers=AUTH, timeout=60) as resp:
        assert resp.status_code == 200
        lines = resp.iter_lines()  # kept: closing this iterator would close the connection
        got = 0
        for line in lines:
            if line.startswith("data: {"):
                got += 1
            if got >= 3:
                break
        assert unfinished(iris_app) == 1  # still generating while we hold the stream
    # The connection is closed here, long before 3000 tokens: the engine lets go of it.
    wait_idle(iris_app)


async def test_overload_is_refused_at_once_and_admitted_requests_finish(
    iris: str, iris_app: IrisApp
) -> None:
    await asyncio.to_thread(wait_idle, iris_app)
    flood = 4 * (LLM_MAX_ONGOING + LLM_MAX_QUEUED)
    body = {**long_stream_body(64), "stream_options": {"include_usage": True}}
    finished = itertools.count()  # the order in which the responses ended

    async def one(client: httpx.AsyncClient) -> tuple[int, int, str, dict[str, str]]:
        async with client.stream("POST", f"{iris}/chat/completions",
                                 json=body, headers=AUTH) as resp:
            text = "".join([chunk async for chunk in resp.aiter_text()])
            return resp.status_code, next(finished), text, dict(resp.headers)

    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=flood)) as c:
        results = await asyncio.gather(*(one(c) for _ in range(flood)))

    ok = [r for r in results if r[0] == 200]
    refused = [r for r in results if r[0] != 200]
    assert refused, "nothing was refused: the queue cap is not enforced"
    assert len(ok) >= LLM_MAX_ONGOING
    for status, _, text, headers in refused:
        assert status == 503 and headers.get("retry-after") == "1"
        assert json.loads(text)["error"]["type"] == "overloaded_error"
    # Refused at once: every refusal came back before the first admitted stream ended.
    assert max(r[1] for r in refused) < min(r[1] for r in ok)
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
