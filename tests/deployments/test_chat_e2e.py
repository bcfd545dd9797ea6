"""End to end through the real app with the official openai client."""

from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest

from handlers.imaging import ProcessorGeometry, smart_resize
from tests.images import data_uri, encode, pattern
from tests.support import API_KEY, MODEL, greedy, image_msg, served_models, top_logprobs

GEO = ProcessorGeometry(min_pixels=3136, max_pixels=1003520)


@pytest.fixture(scope="module")
def client(iris: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=iris, api_key=API_KEY, max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def aclient(iris: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=iris, api_key=API_KEY, max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def png() -> bytes:
    return encode(pattern(320, 240, seed=1))


@pytest.fixture(scope="module")
def sources(png: bytes, image_server, s3) -> dict[str, str]:
    return {
        "data": data_uri(png),
        "http": image_server.add_bytes("/one.png", png),
        "s3": s3.put("iris-test-images", "one.png", png),
    }



def test_health_and_models(iris: str, iris_config: Any) -> None:
    assert httpx.get(iris.removesuffix("/v1") + "/health").status_code == 200
    models = openai.OpenAI(base_url=iris, api_key=API_KEY).models.list()
    assert [m.id for m in models.data] == served_models(iris_config)


@pytest.mark.parametrize("scheme", ["data", "http", "s3"])
def test_sync_one_image_each_source(client: openai.OpenAI, sources: dict[str, str],
                                    scheme: str) -> None:
    resp = client.chat.completions.create(
        model=MODEL, messages=image_msg(sources[scheme]), max_tokens=4
    )
    assert resp.choices[0].message.role == "assistant"
    assert resp.usage is not None and resp.usage.completion_tokens >= 1
    h, w = smart_resize(240, 320, 28, GEO.min_pixels, GEO.max_pixels)
    assert resp.usage.prompt_tokens > GEO.tokens_for(h, w)


def test_sync_two_images_mixed_sources(client: openai.OpenAI, sources: dict[str, str]) -> None:
    one = client.chat.completions.create(model=MODEL, messages=image_msg(sources["s3"]),
                                         max_tokens=1)
    two = client.chat.completions.create(
        model=MODEL, messages=image_msg(sources["http"], sources["s3"]), max_tokens=1
    )
    assert one.usage and two.usage
    h, w = smart_resize(240, 320, 28, GEO.min_pixels, GEO.max_pixels)
    # The second image adds its placeholder tokens plus <|vision_start|>/<|vision_end|>.
    assert two.usage.prompt_tokens - one.usage.prompt_tokens == GEO.tokens_for(h, w) + 2


async def test_async_streaming_with_usage(aclient: openai.AsyncOpenAI,
                                          sources: dict[str, str]) -> None:
    stream = await aclient.chat.completions.create(
        model=MODEL, messages=image_msg(sources["data"], sources["http"]), max_tokens=5,
        stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
    )
    chunks = [c async for c in stream]
    text_chunks = [c for c in chunks if c.choices]
    assert text_chunks and text_chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5
    assert not chunks[-1].choices


async def test_async_non_streaming_and_sync_streaming(
    client: openai.OpenAI, aclient: openai.AsyncOpenAI, sources: dict[str, str]
) -> None:
    resp = await aclient.chat.completions.create(
        model=MODEL, messages=image_msg(sources["s3"]), max_tokens=2
    )
    assert resp.choices[0].finish_reason in ("length", "stop")
    stream = client.chat.completions.create(
        model=MODEL, messages=image_msg(sources["s3"]), max_tokens=2, stream=True
    )
    assert [c for c in stream if c.choices]


def test_same_image_same_logprobs_across_sources(client: openai.OpenAI,
                                                 sources: dict[str, str]) -> None:
    got = {s: top_logprobs(greedy(client, image_msg(u))) for s, u in sources.items()}
    assert got["data"] == got["http"] == got["s3"]


def test_different_image_different_logprobs(client: openai.OpenAI, sources: dict[str, str]) -> None:
    other = data_uri(encode(pattern(320, 240, seed=2)))
    assert top_logprobs(greedy(client, image_msg(other))) != top_logprobs(
        greedy(client, image_msg(sources["data"]))
    )


@pytest.mark.parametrize(("w", "h"), [(100, 80), (640, 480), (1500, 1000), (2000, 2000)])
def test_prompt_tokens_follow_the_grid_rule(client: openai.OpenAI, w: int, h: int) -> None:
    base = client.chat.completions.create(
        model=MODEL, messages=image_msg(data_uri(encode(pattern(56, 56)))), max_tokens=1
    )
    resp = client.chat.completions.create(
        model=MODEL, messages=image_msg(data_uri(encode(pattern(w, h), "JPEG"), "image/jpeg")),
        max_tokens=1,
    )
    assert base.usage and resp.usage
    th, tw = smart_resize(h, w, 28, GEO.min_pixels, GEO.max_pixels)
    assert resp.usage.prompt_tokens - base.usage.prompt_tokens == GEO.tokens_for(th, tw) - 4
