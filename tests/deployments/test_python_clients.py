"""Unmodified Python clients against the running app: LiteLLM (the openai/ and hosted_vllm/
providers, which DSPy and many proxies use) and Pydantic AI (its chat and Responses
models), streaming and not, with s3://, http and data: images."""

from __future__ import annotations

import os
import uuid
from typing import Any

import pytest

from tests.images import data_uri, encode, pattern
from tests.servers import ImageServer, S3Server
from tests.support import API_KEY, MODEL

PNG = encode(pattern(160, 120, seed=51))
# LiteLLM reads its model price map from the network at import unless told not to.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")


@pytest.fixture(scope="module")
def images(s3: S3Server, image_server: ImageServer) -> dict[str, str]:
    key = f"clients-{uuid.uuid4().hex}.png"
    return {"s3": s3.put("iris-test-images", key, PNG), "data": data_uri(PNG),
            "http": image_server.add_bytes(f"/{key}", PNG)}


def messages(url: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [
        {"type": "text", "text": "What is in this picture?"},
        {"type": "image_url", "image_url": {"url": url}}]}]


@pytest.mark.parametrize("provider", ["openai", "hosted_vllm"])
@pytest.mark.parametrize("source", ["s3", "data"])
def test_litellm(iris: str, images: dict[str, str], provider: str, source: str) -> None:
    import litellm

    kw: dict[str, Any] = {"model": f"{provider}/{MODEL}", "api_base": iris,
                          "api_key": API_KEY, "max_tokens": 4,
                          "messages": messages(images[source])}
    resp = litellm.completion(**kw)
    assert resp.usage.prompt_tokens > 30 and resp.choices[0].message.role == "assistant"
    chunks = list(litellm.completion(**kw, stream=True))
    assert chunks and any(c.choices and c.choices[0].delta.content is not None
                          for c in chunks)


def agent(iris: str, responses: bool) -> Any:
    from pydantic_ai import Agent
    from pydantic_ai.models.openai import OpenAIChatModel, OpenAIResponsesModel
    from pydantic_ai.providers.openai import OpenAIProvider

    provider = OpenAIProvider(base_url=iris, api_key=API_KEY)
    model_cls = OpenAIResponsesModel if responses else OpenAIChatModel
    return Agent(model_cls(MODEL, provider=provider),
                 model_settings={"max_tokens": 4, "temperature": 0})


@pytest.mark.parametrize("responses", [False, True], ids=["chat", "responses"])
@pytest.mark.parametrize("content", ["image-url", "binary"])
def test_pydantic_ai(iris: str, images: dict[str, str], responses: bool, content: str) -> None:
    from pydantic_ai import BinaryContent, ImageUrl

    part = (ImageUrl(url=images["http"]) if content == "image-url"
            else BinaryContent(data=PNG, media_type="image/png"))
    result = agent(iris, responses).run_sync(["What is in this picture?", part])
    assert isinstance(result.output, str)
    assert result.usage().input_tokens > 30  # the image reached the model


async def test_pydantic_ai_streams(iris: str, images: dict[str, str]) -> None:
    from pydantic_ai import BinaryContent

    async with agent(iris, responses=False).run_stream(
            ["Describe it.", BinaryContent(data=PNG, media_type="image/png")]) as run:
        text = [t async for t in run.stream_text(delta=True)]
    assert isinstance("".join(text), str)
