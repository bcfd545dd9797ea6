"""Request bodies as today's chat apps send them (replayed from their published clients),
each answered 200 through the running app."""

from __future__ import annotations

from typing import Any

import pytest

from tests.servers import ImageServer
from tests.support import MODEL, SMALL_PNG, post_chat

QUESTION = [{"type": "text", "text": "What is in this picture?"}]


def open_webui(image_server: ImageServer) -> list[dict[str, Any]]:
    """A streamed chat with a data URI and `detail`, its sampling keys flattened into the
    body, then the non-streamed title and tag calls it makes after the first answer."""
    chat = {
        "stream": True, "model": MODEL, "max_tokens": 8,
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": [*QUESTION, {"type": "image_url", "image_url": {
                "url": SMALL_PNG, "detail": "auto"}}]},
        ],
        "min_p": 0.05, "top_k": 40, "repetition_penalty": 1.1, "seed": 42,
        "stream_options": {"include_usage": True},
    }
    title = {"model": MODEL, "stream": False, "max_tokens": 50, "messages": [
        {"role": "user", "content": "### Task:\nGenerate a concise, 3-5 word title with an "
                                    "emoji summarizing the chat history.\n### Chat History:"
                                    "\n<chat_history>\nUSER: What is in this picture?\n"
                                    "</chat_history>"}]}
    tags = {**title, "messages": [{"role": "user", "content": "### Task:\nGenerate 1-3 broad "
                                   "tags categorizing the main themes of the chat history."}]}
    return [chat, title, tags]


def librechat(image_server: ImageServer) -> list[dict[str, Any]]:
    return [{
        "model": MODEL, "temperature": 1, "top_p": 1, "presence_penalty": 0,
        "frequency_penalty": 0, "user": "6740f3c2a1b2c3d4e5f60718", "stream": True,
        "stream_options": {"include_usage": True}, "max_tokens": 8,
        "messages": [{"role": "user", "content": [*QUESTION, {"type": "image_url",
                                                              "image_url": {"url": SMALL_PNG,
                                                                            "detail": "auto"}}]}],
    }]


def lobechat(image_server: ImageServer) -> list[dict[str, Any]]:
    """With LLM_VISION_IMAGE_USE_BASE64=1 (its own storage URLs are usually private), and
    the previous answer's reasoning_content kept in the history."""
    return [{
        "model": MODEL, "user": "lobe-user-1", "stream": True, "temperature": 1, "top_p": 1,
        "frequency_penalty": 0, "presence_penalty": 0, "max_tokens": 8,
        "messages": [
            {"role": "user", "content": [*QUESTION, {"type": "image_url",
                                                     "image_url": {"url": SMALL_PNG}}]},
            {"role": "assistant", "content": "A pattern.",
             "reasoning_content": "The image shows shapes."},
            {"role": "user", "content": "And the colours?"},
        ],
    }]


@pytest.mark.parametrize("app", [open_webui, librechat, lobechat],
                         ids=["open-webui", "librechat", "lobechat"])
def test_replayed_bodies_are_answered(iris: str, image_server: ImageServer, app: Any) -> None:
    bodies = app(image_server)
    assert bodies
    for body in bodies:
        resp = post_chat(iris, body)
        assert resp.status_code == 200, resp.text
        if body.get("stream"):
            assert resp.text.rstrip().endswith("data: [DONE]")
            assert '"error"' not in resp.text
        else:
            assert resp.json()["choices"][0]["message"]["role"] == "assistant"
