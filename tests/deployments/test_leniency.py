"""Lenient where OpenAI and vLLM are: every spelling of an image part today's clients send
is accepted, and fetched by Iris (a loopback server counts the hits)."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from tests.images import encode, pattern
from tests.servers import ImageServer
from tests.support import good_body, post_chat

PNG = encode(pattern(300, 200, seed=31))


def ask(iris: str, part: dict[str, Any]) -> int:
    """The prompt tokens of a one-image question (fails unless answered 200)."""
    body = good_body(messages=[{"role": "user", "content": [
        part, {"type": "text", "text": "What is this?"}]}])
    resp = post_chat(iris, body)
    assert resp.status_code == 200, resp.text
    return int(resp.json()["usage"]["prompt_tokens"])


def served(image_server: ImageServer) -> tuple[str, str]:
    path = f"/lenient-{uuid.uuid4().hex}.png"  # new to every layout's fetcher
    return path, image_server.add_bytes(path, PNG)


@pytest.mark.parametrize("spelling", [
    "detail-original", "detail-null", "extra-keys", "bare-string", "input-image",
    "input-image-detail",
])
def test_every_image_spelling_is_served_through_irises_fetcher(
    iris: str, image_server: ImageServer, spelling: str
) -> None:
    path, url = served(image_server)
    part = {
        "detail-original": {"type": "image_url", "image_url": {"url": url, "detail": "original"}},
        "detail-null": {"type": "image_url", "image_url": {"url": url, "detail": None}},
        "extra-keys": {"type": "image_url", "image_url": {"url": url, "format": "png",
                                                          "uuid": "client-chosen"}},
        "bare-string": {"type": "image_url", "image_url": url},
        "input-image": {"type": "input_image", "image_url": url},
        "input-image-detail": {"type": "input_image", "image_url": url, "detail": "low"},
    }[spelling]
    assert ask(iris, part) > 30
    assert image_server.hits[path] == 1  # Iris fetched it, once; the engine did not


def test_original_detail_is_full_resolution_and_null_means_auto(
    iris: str, image_server: ImageServer
) -> None:
    _, url = served(image_server)

    def tokens(detail: Any) -> int:
        return ask(iris, {"type": "image_url", "image_url": {"url": url, "detail": detail}})

    assert tokens("original") == tokens("high") == tokens(None) == tokens("auto")
