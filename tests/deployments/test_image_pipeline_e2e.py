"""The image pipeline through the real app: caching, single-flight, detail, errors."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import openai

from tests.conftest import LLM_MAX_ONGOING
from tests.deployments.test_api_contract import AUTH, assert_envelope, assert_still_serving
from tests.deployments.test_chat_e2e import API_KEY, MODEL, image_msg
from tests.images import data_uri, encode, pattern


def prep_stats(app_name: str) -> dict[str, Any]:
    from ray import serve

    return serve.get_deployment_handle("ImagePreprocessor", app_name).stats.remote().result()


async def test_concurrent_requests_for_one_new_url_fetch_it_once(
    iris: str, image_server  # type: ignore[no-untyped-def]
) -> None:
    url = image_server.add_bytes("/single-flight.png", encode(pattern(500, 400, seed=77)))
    client = openai.AsyncOpenAI(base_url=iris, api_key=API_KEY, max_retries=0, timeout=300)
    replies = await asyncio.gather(*(
        client.chat.completions.create(model=MODEL, messages=image_msg(url), max_tokens=1)
        # No more than the test app's engine runs at once: past that, its small queue may
        # refuse some (Serve counts queued requests per handle, approximately).
        for _ in range(LLM_MAX_ONGOING)
    ))
    assert len({r.usage.prompt_tokens for r in replies if r.usage}) == 1
    assert image_server.hits["/single-flight.png"] == 1


def test_repeated_image_is_preprocessed_once(iris: str, iris_config, image_server) -> None:  # type: ignore[no-untyped-def]
    client = openai.OpenAI(base_url=iris, api_key=API_KEY, max_retries=0, timeout=300)
    url = image_server.add_bytes("/repeat.jpg", encode(pattern(900, 700, seed=78), "JPEG"),
                                 "image/jpeg")
    before = prep_stats(iris_config.app_name)
    first = client.chat.completions.create(model=MODEL, messages=image_msg(url), max_tokens=1)
    second = client.chat.completions.create(model=MODEL, messages=image_msg(url), max_tokens=1)
    after = prep_stats(iris_config.app_name)
    assert after["misses"] - before["misses"] == 1
    assert after["hits"] - before["hits"] == 1
    assert first.usage and second.usage
    assert first.usage.prompt_tokens == second.usage.prompt_tokens


def test_repeated_data_uri_skips_the_preprocessor(iris: str, iris_config) -> None:  # type: ignore[no-untyped-def]
    client = openai.OpenAI(base_url=iris, api_key=API_KEY, max_retries=0, timeout=300)
    url = data_uri(encode(pattern(700, 500, seed=80), "JPEG"), "image/jpeg")
    first = client.chat.completions.create(model=MODEL, messages=image_msg(url), max_tokens=1)
    before = prep_stats(iris_config.app_name)
    second = client.chat.completions.create(model=MODEL, messages=image_msg(url), max_tokens=1)
    after = prep_stats(iris_config.app_name)
    assert after["hits"] == before["hits"] and after["misses"] == before["misses"]
    assert first.usage and second.usage
    assert first.usage.prompt_tokens == second.usage.prompt_tokens


def test_detail_low_caps_tokens_and_high_uses_the_maximum(iris: str) -> None:
    client = openai.OpenAI(base_url=iris, api_key=API_KEY, max_retries=0, timeout=300)
    url = data_uri(encode(pattern(2000, 1500, seed=79), "JPEG"), "image/jpeg")

    def tokens(detail: str) -> int:
        msgs = [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url, "detail": detail}},
            {"type": "text", "text": "x"}]}]
        r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=1)  # type: ignore[arg-type]
        assert r.usage
        return r.usage.prompt_tokens

    low, high, auto = tokens("low"), tokens("high"), tokens("auto")
    assert auto == high  # the shipped default: auto means high
    assert high - low > 500
    assert low < 256 + 40  # <= 256 image tokens plus the template's text


def test_image_errors_name_the_part_and_server_keeps_serving(iris: str, image_server) -> None:  # type: ignore[no-untyped-def]
    missing = image_server.url("/does-not-exist.png")
    not_image = image_server.add_bytes("/text.png", b"hello, not an image", "image/png")
    for url, code in [(missing, "image_not_found"), (not_image, "invalid_image")]:
        body = {"model": MODEL, "max_tokens": 1, "messages": [{"role": "user", "content": [
            {"type": "text", "text": "x"}, {"type": "image_url", "image_url": {"url": url}}]}]}
        resp = httpx.post(f"{iris}/chat/completions", json=body, headers=AUTH, timeout=60)
        err = assert_envelope(resp, 400)
        assert err["param"] == "messages[0].content[1].image_url.url" and err["code"] == code
        assert_still_serving(iris)
