"""The benchmark client: what it sends and how it reads a streamed answer; the realistic
workloads' images (distinct, photo-like) and conversations (history re-sent), made before
the clock."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import time
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from load_tests import workload
from load_tests.workload import (
    Conversation,
    Images,
    StreamResult,
    Workload,
    chat_body,
    encoded,
    make_plan,
    run_workload,
    stream_chat,
)
from tests.load_tests.fake_openai import FakeOpenAI

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


# --- realistic workloads: distinct photo-like images, conversations, bodies made first ---



def _decode(uri: str) -> Image.Image:
    assert uri.startswith("data:image/jpeg;base64,")
    return Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))


def _uris(body: bytes | dict) -> list[str]:
    doc = json.loads(body) if isinstance(body, bytes) else body
    return [p["image_url"]["url"] for m in doc["messages"] if isinstance(m["content"], list)
            for p in m["content"] if p["type"] == "image_url"]


def _photo_like(img: Image.Image) -> bool:
    """Not flat (spread of values) and not noise (neighbours alike, as in photographs)."""
    a = np.asarray(img).astype(np.float32)
    return bool(a.std() > 20 and np.abs(np.diff(a, axis=1)).mean() < 0.7 * a.std())


@pytest.mark.parametrize("size", [(96, 64), (160, 120)])
def test_every_image_is_distinct_photo_like_and_the_right_size(size: tuple[int, int]) -> None:
    images = Images(salt=11, bases=2)
    uris = [images.data_uri(*size) for _ in range(24)]
    decoded = [_decode(u) for u in uris]
    assert len({hashlib.sha256(u.encode()).digest() for u in uris}) == len(uris)
    # Distinct to a server that hashes decoded pixels too (as vLLM's multimodal cache does).
    assert len({hashlib.sha256(d.tobytes()).digest() for d in decoded}) == len(uris)
    assert all(d.size == size and d.format == "JPEG" for d in decoded)
    assert all(_photo_like(d) for d in decoded)
    # Different runs (salts) never share an image either.
    other = Images(salt=12, bases=2).data_uri(*size)
    assert other not in uris


def test_a_large_image_is_derived_cheaply_from_a_base(monkeypatch: pytest.MonkeyPatch
                                                       ) -> None:
    made: list[tuple[int, int]] = []
    real = workload.natural

    def counted(w: int, h: int, seed: int) -> Any:
        made.append((w, h))
        return real(w, h, seed=seed)

    monkeypatch.setattr(workload, "natural", counted)
    images = Images(salt=3, bases=1)
    images.image(400, 300)  # makes the base: the one slow step (seconds at 12 MP)
    a, b = images.image(400, 300), images.image(400, 300)
    assert made == [(400, 300)]  # no new base: a shift, a mirror, a patch
    assert a.size == b.size == (400, 300) and a.tobytes() != b.tobytes()
    assert _photo_like(a) and _photo_like(b)


def test_fresh_plans_never_share_an_image_with_one_another() -> None:
    """Warm-up and measured requests, on two servers: all distinct, and a same-image
    workload sends one body again and again."""
    images = Images(salt=5)
    fresh = Workload("fresh-small", size=(64, 48), requests=6)
    plans = [make_plan("m", fresh, images, n) for n in (2, 6, 2, 6)]
    sent = [u for p in plans for b in p.bodies for u in _uris(b)]
    assert len(sent) == 16 == len(set(sent))
    same = make_plan("m", Workload("same", ("data:image/png;base64,AA",), requests=5))
    assert len(same.bodies) == 5 and len({id(b) for b in same.bodies}) == 1
    with pytest.raises(ValueError, match="not both"):
        Workload("x", ("data:,",), size=(1, 1))


def test_a_conversation_re_sends_its_history() -> None:
    conv = Conversation.start("m", "data:image/jpeg;base64,AAAA", 8,
                              questions=("q1", "q2", "q3", "q4"))
    assert conv.turns == 4
    first = json.loads(conv.body([]))
    assert first == {**chat_body("m", "data:image/jpeg;base64,AAAA", 8),
                     "messages": [{"role": "user", "content": [
                         {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,AAAA"}},
                         {"type": "text", "text": "q1"}]}]}
    third = conv.body(["a1", "a2"])
    assert json.loads(third)["messages"] == first["messages"] + [
        {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "a2"}, {"role": "user", "content": "q3"}]
    # The first message (and its data: URI) is the bytes encoded once, not encoded again.
    assert conv.opening in third and third.count(b"data:image") == 1


def test_chat_plan_counts_turns_and_gives_each_conversation_its_own_image() -> None:
    chat = Workload("chat-4turns", size=(64, 48), turns=4, requests=10)
    plan = make_plan("m", chat, Images(salt=9))
    assert len(plan.conversations) == 3 and plan.requests == 12  # rounded up to whole ones
    uris = [u for c in plan.conversations for u in _uris(c.body([]))]
    assert len(set(uris)) == 3


def test_conversations_run_end_to_end_with_images_made_before_the_clock() -> None:
    """Against a loopback fake: c=2 conversations of 4 turns, then single requests; every
    image made before the first request arrived, each turn re-sending the real answers."""
    server = FakeOpenAI()
    images = Images(salt=21)
    made: list[float] = []
    real = images.data_uri

    def timed(w: int, h: int) -> str:
        made.append(time.perf_counter())
        return real(w, h)

    images.data_uri = timed  # type: ignore[method-assign]
    try:
        chat = Workload("chat-4turns", size=(64, 48), turns=4, requests=12, concurrency=2)
        r = asyncio.run(run_workload(server.base_url, "m", chat, "fake", images=images))
        assert r.ok == 12 and not r.errors
        assert max(made) < min(server.arrivals)
        by_image: dict[str, list[dict]] = {}
        for body in server.bodies:
            by_image.setdefault(_uris(body)[0], []).append(body)
        assert len(by_image) == 3
        for turns in by_image.values():
            turns.sort(key=lambda b: len(b["messages"]))
            assert [len(b["messages"]) for b in turns] == [1, 3, 5, 7]
            final = turns[-1]["messages"]
            # The answers re-sent are the ones the server streamed for the earlier turns.
            answers = [m["content"] for m in final if m["role"] == "assistant"]
            assert all(a.startswith("answer ") for a in answers)
            assert all(turns[k]["messages"] == final[:2 * k + 1] for k in range(4))
        s = r.summary()
        assert list(s["ttft_p50_ms_by_turn"]) == [1, 2, 3, 4]
        assert 0 < s["cached_tokens"] < s["prompt_tokens"] and s["cached_tokens_pct"] > 50
        # Single requests: one distinct image each, made before the first one went out.
        made.clear()
        n = len(server.bodies)
        fresh = Workload("fresh-small", size=(64, 48), requests=4, concurrency=2)
        r = asyncio.run(run_workload(server.base_url, "m", fresh, "fake", images=images))
        assert r.ok == 4 and max(made) < min(server.arrivals[n:])
        assert r.summary()["cached_tokens"] == 0
        assert len({_uris(b)[0] for b in server.bodies}) == 3 + 4
    finally:
        server.close()
