"""The image pipeline through the real app: caching, single-flight, detail, errors."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import httpx
import openai

from tests.images import data_uri, encode, pattern
from tests.support import (
    API_KEY,
    AUTH,
    LLM_MAX_ONGOING,
    MODEL,
    assert_envelope,
    assert_still_serving,
    image_msg,
)


def prep_stats(app_name: str) -> dict[str, Any]:
    from ray import serve

    return serve.get_deployment_handle("ImagePreprocessor", app_name).stats.remote().result()


async def test_concurrent_requests_for_one_new_url_fetch_it_once(
    iris: str, image_server
) -> None:
    path = f"/single-flight-{uuid.uuid4().hex}.png"  # new to every layout's fetcher
    url = image_server.add_bytes(path, encode(pattern(500, 400, seed=77)))
    client = openai.AsyncOpenAI(base_url=iris, api_key=API_KEY, max_retries=0, timeout=300)
    replies = await asyncio.gather(*(
        client.chat.completions.create(model=MODEL, messages=image_msg(url), max_tokens=1)
        # No more than the test app's engine runs at once: past that, its small queue may
        # refuse some (Serve counts queued requests per handle, approximately).
        for _ in range(LLM_MAX_ONGOING)
    ))
    assert len({r.usage.prompt_tokens for r in replies if r.usage}) == 1
    assert image_server.hits[path] == 1


def test_repeated_image_is_preprocessed_once(iris: str, iris_config, image_server) -> None:
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


def ingress_image_stats(app_name: str) -> dict[str, int]:
    import ray

    from tests.support import replica_actors

    (ingress,) = replica_actors(app_name, "ChatIngress")
    stats: dict[str, int] = ray.get(ingress.record_routing_stats.remote(),
                                    timeout=30)["recent_images"]
    return stats


def test_a_data_uri_is_prepared_once_then_served_from_the_ingress(iris: str, iris_config
                                                                  ) -> None:
    """The first time: by the preprocessor (split), or in the ingress itself (local:
    deployments.data_uris_in_ingress, make serve's layout). A repeat (a chat app re-sends
    its conversation's images every turn) reaches neither."""
    client = openai.OpenAI(base_url=iris, api_key=API_KEY, max_retries=0, timeout=300)
    url = data_uri(encode(pattern(700, 500, seed=80), "JPEG"), "image/jpeg")
    in_ingress = iris_config.deployments.data_uris_in_ingress
    prep0, ing0 = prep_stats(iris_config.app_name), ingress_image_stats(iris_config.app_name)
    first = client.chat.completions.create(model=MODEL, messages=image_msg(url), max_tokens=1)
    prep1, ing1 = prep_stats(iris_config.app_name), ingress_image_stats(iris_config.app_name)
    assert prep1["misses"] - prep0["misses"] == (0 if in_ingress else 1)
    assert ing1["misses"] - ing0["misses"] == 1 and ing1["hits"] == ing0["hits"]
    second = client.chat.completions.create(model=MODEL, messages=image_msg(url), max_tokens=1)
    prep2, ing2 = prep_stats(iris_config.app_name), ingress_image_stats(iris_config.app_name)
    assert (prep2["hits"], prep2["misses"]) == (prep1["hits"], prep1["misses"])
    assert ing2["hits"] - ing1["hits"] == 1 and ing2["misses"] == ing1["misses"]
    assert first.usage and second.usage
    assert first.usage.prompt_tokens == second.usage.prompt_tokens


def test_detail_low_caps_tokens_and_high_uses_the_maximum(iris: str) -> None:
    client = openai.OpenAI(base_url=iris, api_key=API_KEY, max_retries=0, timeout=300)
    url = data_uri(encode(pattern(2000, 1500, seed=79), "JPEG"), "image/jpeg")

    def tokens(detail: str) -> int:
        msgs = [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url, "detail": detail}},
            {"type": "text", "text": "x"}]}]
        r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=1)
        assert r.usage
        return r.usage.prompt_tokens

    low, high, auto = tokens("low"), tokens("high"), tokens("auto")
    assert auto == high  # the shipped default: auto means high
    assert high - low > 500
    assert low < 256 + 40  # <= 256 image tokens plus the template's text


def test_image_errors_name_the_part_and_server_keeps_serving(iris: str, image_server) -> None:
    missing = image_server.url("/does-not-exist.png")
    not_image = image_server.add_bytes("/text.png", b"hello, not an image", "image/png")
    refused = "http://127.0.0.1:1/closed.png"  # nothing listens on port 1
    for url, code in [(missing, "image_not_found"), (not_image, "invalid_image"),
                      (refused, "image_unreachable")]:
        body = {"model": MODEL, "max_tokens": 1, "messages": [{"role": "user", "content": [
            {"type": "text", "text": "x"}, {"type": "image_url", "image_url": {"url": url}}]}]}
        resp = httpx.post(f"{iris}/chat/completions", json=body, headers=AUTH, timeout=60)
        err = assert_envelope(resp, 400)
        assert err["param"] == "messages[0].content[1].image_url.url" and err["code"] == code
        assert_still_serving(iris)


def test_a_failing_image_source_is_a_502_that_names_the_image(iris: str, image_server) -> None:
    url = image_server.add_status("/busy.png", 503)
    body = {"model": MODEL, "max_tokens": 1, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "x"}, {"type": "image_url", "image_url": {"url": url}}]}]}
    resp = httpx.post(f"{iris}/chat/completions", json=body, headers=AUTH, timeout=60)
    err = assert_envelope(resp, 502)
    assert err["type"] == "upstream_error" and err["code"] == "image_source_unavailable"
    assert err["param"] == "messages[0].content[1].image_url.url"
    assert_still_serving(iris)


def test_an_avif_image_is_served(iris: str) -> None:
    """The fetcher's sniffing and the decoder share one list of formats (AVIF included)."""
    url = data_uri(encode(pattern(96, 64, seed=81), "AVIF"), "image/avif")
    client = openai.OpenAI(base_url=iris, api_key=API_KEY, max_retries=0, timeout=300)
    resp = client.chat.completions.create(model=MODEL, messages=image_msg(url), max_tokens=1)
    assert resp.usage and resp.usage.prompt_tokens > 10
