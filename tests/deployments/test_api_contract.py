"""The OpenAI contract as clients see it: errors, auth, limits, the chat surface."""

from __future__ import annotations

import base64
from typing import Any

import httpx
import openai
import pytest

from tests.images import encode, pattern
from tests.support import (
    API_KEY,
    API_KEYS,
    AUTH,
    MODEL,
    SMALL_PNG,
    assert_envelope,
    assert_still_serving,
    good_body,
    image_msg,
    post_chat,
    root,
)


def png_truncated() -> str:
    data = encode(pattern(200, 200))
    return "data:image/png;base64," + base64.b64encode(data[: len(data) // 2]).decode()


def msgs(*parts: Any, role: str = "user") -> list[dict[str, Any]]:
    return [{"role": role, "content": list(parts)}]


def img(url: Any, **extra: Any) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url, **extra}}


# (id, body or raw bytes, expected status, expected param prefix or None)
BAD_INPUTS: list[tuple[str, Any, int, str | None]] = [
    ("malformed-json", b'{"model": "demo-vlm", "messages": [', 400, None),
    ("not-an-object", [1, 2, 3], 400, None),
    ("empty-body", b"", 400, None),
    ("no-model", {"messages": [{"role": "user", "content": "x"}]}, 400, "model"),
    ("model-wrong-type", {"model": 5, "messages": [{"role": "user", "content": "x"}]}, 400,
     "model"),
    ("no-messages", {"model": MODEL}, 400, "messages"),
    ("empty-messages", {"model": MODEL, "messages": []}, 400, "messages"),
    ("messages-not-list", {"model": MODEL, "messages": "hi"}, 400, "messages"),
    ("message-not-object", {"model": MODEL, "messages": ["hi"]}, 400, "messages"),
    ("unknown-role", {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, 400,
     "messages[0].role"),
    ("content-wrong-type", {"model": MODEL, "messages": [{"role": "user", "content": 5}]}, 400,
     "messages[0].content"),
    ("part-without-type", {"model": MODEL, "messages": msgs({"text": "x"})}, 400,
     "messages[0].content[0]"),
    ("image-url-wrong-type", {"model": MODEL, "messages": msgs(
        {"type": "image_url", "image_url": 5})}, 400, "messages[0].content[0].image_url"),
    ("input-image-file-id", {"model": MODEL, "messages": msgs(
        {"type": "input_image", "file_id": "file-1"})}, 400,
     "messages[0].content[0].file_id"),
    ("image-url-missing-url", {"model": MODEL, "messages": msgs(
        {"type": "image_url", "image_url": {}})}, 400, "messages[0].content[0].image_url"),
    ("bad-detail", {"model": MODEL, "messages": msgs(img(SMALL_PNG, detail="ultra"))}, 400,
     "messages[0].content[0].image_url.detail"),
    ("bad-base64", {"model": MODEL, "messages": msgs(img("data:image/png;base64,%%%"))}, 400,
     "messages[0].content[0].image_url.url"),
    ("non-image-data", {"model": MODEL, "messages": msgs(
        img("data:image/png;base64," + base64.b64encode(b"hello world").decode()))}, 400,
     "messages[0].content[0].image_url.url"),
    ("truncated-image", {"model": MODEL, "messages": msgs(img(png_truncated()))}, 400,
     "messages[0].content[0].image_url.url"),
    ("file-scheme", {"model": MODEL, "messages": msgs(img("file:///etc/passwd"))}, 400,
     "messages[0].content[0].image_url.url"),
    ("ftp-scheme", {"model": MODEL, "messages": msgs(img("ftp://127.0.0.1/a.png"))}, 400,
     "messages[0].content[0].image_url.url"),
    ("empty-url", {"model": MODEL, "messages": msgs(img(""))}, 400,
     "messages[0].content[0].image_url.url"),
    ("missing-s3-object", {"model": MODEL, "messages": msgs(
        {"type": "text", "text": "x"}, img("s3://iris-test-images/nope.png"))}, 400,
     "messages[0].content[1].image_url.url"),
    ("too-many-images", {"model": MODEL, "messages": msgs(*[img(SMALL_PNG)] * 9)}, 400,
     "messages"),
    ("negative-max-tokens", good_body(max_tokens=-1), 400, None),
    ("temperature-wrong-type", good_body(temperature="hot"), 400, None),
    ("n-zero", good_body(n=0), 400, None),
    ("bad-response-format", good_body(response_format={"type": "xml"}), 400, None),
    ("stream-wrong-type", good_body(stream="yes please"), 400, "stream"),
    ("stream-options-without-stream", good_body(stream_options={"include_usage": True}), 400,
     "stream_options"),
    ("top-logprobs-too-high", good_body(logprobs=True, top_logprobs=1000), 400, None),
]


@pytest.mark.parametrize(("case", "body", "status", "param"), BAD_INPUTS,
                         ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_table(iris: str, case: str, body: Any, status: int,
                         param: str | None) -> None:
    raw = body if isinstance(body, bytes) else None
    resp = post_chat(iris, None if raw is not None else body, raw=raw)
    err = assert_envelope(resp, status)
    assert err["type"] == "invalid_request_error"
    if param is not None:
        assert (err["param"] or "").startswith(param), err
    assert_still_serving(iris)


def test_unknown_model_is_404_through_sdk(iris: str) -> None:
    client = openai.OpenAI(base_url=iris, api_key=API_KEY, max_retries=0)
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "x"}])
    assert info.value.body["param"] == "model"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-9")
    assert client.models.retrieve(MODEL).id == MODEL


def test_unknown_route_is_404_envelope(iris: str) -> None:
    assert_envelope(httpx.get(f"{iris}/nope", headers=AUTH), 404)
    assert_envelope(httpx.post(f"{iris}/completions/nope", headers=AUTH), 404)


def test_bad_request_through_sdk(iris: str) -> None:
    client = openai.OpenAI(base_url=iris, api_key=API_KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=image_msg("file:///etc/passwd"))
    assert info.value.body["param"] == "messages[0].content[0].image_url.url"


def test_auth(iris: str) -> None:
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=iris, api_key="wrong", max_retries=0).models.list()
    assert openai.OpenAI(base_url=iris, api_key=API_KEYS[1]).models.list().data
    base = root(iris)
    assert httpx.get(f"{base}/health").status_code == 200
    assert_envelope(httpx.get(f"{base}/ready"), 401)
    assert httpx.get(f"{base}/ready", headers=AUTH).json() == {"status": "ready"}
    # No variant of a path or method slips past the check.
    for method, path in [("GET", "/v1/models/"), ("GET", "/v1/models"), ("GET", "/health/"),
                         ("OPTIONS", "/v1/chat/completions"), ("POST", "/v1/chat/completions/"),
                         ("GET", "//v1/models"), ("GET", "/v1/models/demo-vlm")]:
        resp = httpx.request(method, base + path)
        assert_envelope(resp, 401)
    for bad in ["Bearer", f"Basic {API_KEY}", f"Bearer {API_KEY}x", f"Bearer {API_KEY[:-1]}"]:
        assert_envelope(httpx.get(f"{iris}/models", headers={"Authorization": bad}), 401)


def test_request_id_echoed(iris: str) -> None:
    resp = post_chat(iris, good_body(), headers={"x-request-id": "abc-123"})
    assert resp.headers["x-request-id"] == "abc-123"
    assert len(post_chat(iris, good_body()).headers["x-request-id"]) >= 16


def test_body_over_limit_is_413(iris: str, iris_config) -> None:
    limit = iris_config.limits.max_body_bytes
    body = good_body(user="x" * (limit + 10))
    assert_envelope(post_chat(iris, body), 413)
    assert_still_serving(iris)


def test_chat_surface_parameters(iris: str) -> None:
    client = openai.OpenAI(base_url=iris, api_key=API_KEY, max_retries=0, timeout=120)
    m = image_msg(SMALL_PNG)
    r = client.chat.completions.create(model=MODEL, messages=m, n=2, max_completion_tokens=3,
                                       seed=1, temperature=0.7, top_p=0.9, stop=["\n"],
                                       presence_penalty=0.5, frequency_penalty=0.5, user="u1")
    assert len(r.choices) == 2
    r = client.chat.completions.create(model=MODEL, messages=m, max_tokens=8,
                                       response_format={"type": "json_object"})
    assert r.choices[0].finish_reason in ("length", "stop")
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    r = client.chat.completions.create(
        model=MODEL, messages=m, max_tokens=20,
        response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": schema}},
    )
    assert r.choices[0].message.content is not None
    # Unknown fields from newer clients are ignored, not rejected.
    r = client.chat.completions.create(model=MODEL, messages=m, max_tokens=1,
                                       extra_body={"some_future_field": {"x": 1}})
    assert r.choices


def test_images_across_messages_and_in_system(iris: str) -> None:
    client = openai.OpenAI(base_url=iris, api_key=API_KEY, max_retries=0, timeout=120)
    one = client.chat.completions.create(model=MODEL, messages=image_msg(SMALL_PNG), max_tokens=1)
    multi = client.chat.completions.create(model=MODEL, max_tokens=1, messages=[
        {"role": "system", "content": [img(SMALL_PNG), {"type": "text", "text": "sys"}]},
        *image_msg(SMALL_PNG, SMALL_PNG),
        {"role": "assistant", "content": "ok"},
        *image_msg(SMALL_PNG),
    ])
    assert one.usage and multi.usage
    assert multi.usage.prompt_tokens > 3 * one.usage.prompt_tokens - 60
