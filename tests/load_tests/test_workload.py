"""The benchmark client: what it sends and how it reads a streamed answer."""

from __future__ import annotations

import asyncio
import json

import httpx

from load_tests.workload import StreamResult, chat_body, encoded, stream_chat

SSE = (
    b'data: {"choices": [{"delta": {"role": "assistant"}}]}\n\n'
    b'data: {"choices": [{"delta": {"content": "hi"}}]}\n\n'
    b"data: [DONE]\n\n"
)


def _post(body: dict | bytes, answer: bytes = SSE) -> tuple[list[httpx.Request], StreamResult]:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, content=answer)

    async def go() -> StreamResult:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            return await stream_chat(client, "http://127.0.0.1:1/v1/chat/completions", body)

    return seen, asyncio.run(go())


def test_a_pre_encoded_body_is_sent_as_json_unchanged() -> None:
    body = chat_body("m", "data:image/png;base64,AAAA", 8)
    sent = encoded(body)
    seen, res = _post(sent)
    assert seen[0].content == sent
    assert seen[0].headers["content-type"] == "application/json"
    assert json.loads(seen[0].content) == body
    assert res.ok and res.first_token_s is not None


def test_a_dict_body_is_encoded_the_same_way() -> None:
    body = chat_body("m", "data:image/png;base64,AAAA", 8)
    seen, res = _post(body)
    assert seen[0].content == encoded(body)
    assert res.ok


def test_a_stream_without_done_fails() -> None:
    body = encoded(chat_body("m", "data:image/png;base64,AAAA", 8))
    _, res = _post(body, answer=b'data: {"choices": [{"delta": {"content": "hi"}}]}\n\n')
    assert not res.ok and "without [DONE]" in res.error
