"""No side doors: only Iris's fetcher fetches. Every content part is either Iris's to handle
or refused with a 400 naming it, and a loopback server counts what reached it."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from tests.images import data_uri, encode, pattern, png_bomb
from tests.servers import ImageServer
from tests.support import assert_envelope, good_body, post_chat

PNG = encode(pattern(64, 48, seed=21))


def user(*parts: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "text", "text": "What is this?"}, *parts]}]


# Media parts vLLM would load by itself (or that carry media Iris did not vet).
FOREIGN_PARTS: dict[str, Any] = {
    "video_url": lambda url: {"type": "video_url", "video_url": {"url": url}},
    "audio_url": lambda url: {"type": "audio_url", "audio_url": {"url": url}},
    "input_audio": lambda url: {"type": "input_audio",
                                "input_audio": {"data": "AAAA", "format": "wav"}},
    "file": lambda url: {"type": "file", "file": {"file_data": "AAAA", "filename": "a.pdf"}},
    "image_embeds": lambda url: {"type": "image_embeds", "image_embeds": "AAAA"},
    "image_pil": lambda url: {"type": "image_pil", "image_pil": url},
    "made-up": lambda url: {"type": "hologram", "hologram": {"url": url}},
}


@pytest.mark.parametrize("kind", sorted(FOREIGN_PARTS))
def test_media_parts_iris_does_not_handle_are_refused_and_never_fetched(
    iris: str, image_server: ImageServer, kind: str
) -> None:
    path = f"/side-door-{kind}.png"
    url = image_server.add_bytes(path, PNG)
    resp = post_chat(iris, good_body(messages=user(FOREIGN_PARTS[kind](url))))
    err = assert_envelope(resp, 400)
    assert err["param"] == "messages[0].content[1].type", err
    assert image_server.hits[path] == 0


def test_media_keys_smuggled_onto_a_text_part_never_reach_the_engine(
    iris: str, image_server: ImageServer
) -> None:
    """vLLM reads a part by its keys when it has a uuid: a text part carrying a uuid and a
    video_url would make the engine fetch. Iris rebuilds every part from its known fields."""
    url = image_server.add_bytes("/side-door-smuggled.png", PNG)
    part = {"type": "text", "text": "hi", "uuid": "x", "video_url": {"url": url},
            "image_url": {"url": url}}
    resp = post_chat(iris, good_body(messages=[{"role": "user", "content": [part]}]))
    assert resp.status_code == 200, resp.text
    assert image_server.hits["/side-door-smuggled.png"] == 0


def test_an_image_bomb_sent_as_data_uri_is_a_400_that_says_why(iris: str) -> None:
    resp = post_chat(iris, good_body(messages=user(
        {"type": "image_url", "image_url": {"url": data_uri(png_bomb(40000))}})))
    err = assert_envelope(resp, 400)
    assert err["code"] == "image_too_large"
    assert "40000x40000" in err["message"], err
    assert err["param"] == "messages[0].content[1].image_url.url"


def test_an_image_url_part_is_fetched_once_by_iris(iris: str, image_server: ImageServer) -> None:
    """The control: the same server, reached through Iris's own pipeline."""
    path = f"/front-door-{uuid.uuid4().hex}.png"  # new to every layout's fetcher
    url = image_server.add_bytes(path, PNG)
    part = {"type": "image_url", "image_url": {"url": url}}
    resp = post_chat(iris, good_body(messages=user(part)))
    assert resp.status_code == 200, resp.text
    assert image_server.hits[path] == 1


def test_the_engine_itself_refuses_every_url(
    image_server: ImageServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second wall, in the engine process's vLLM: its media connector loads nothing."""
    from vllm import envs
    from vllm.multimodal.media import MEDIA_CONNECTOR_REGISTRY

    from handlers.engine import ENGINE_FETCH_REFUSED, refuse_engine_fetches

    monkeypatch.setenv("VLLM_MEDIA_CONNECTOR", "http")  # restored after the test
    refuse_engine_fetches()
    connector = MEDIA_CONNECTOR_REGISTRY.load(envs.VLLM_MEDIA_CONNECTOR)
    url = image_server.add_bytes("/engine-door.png", PNG)
    for target in (url, data_uri(PNG), "file:///etc/passwd"):
        with pytest.raises(ValueError, match=ENGINE_FETCH_REFUSED):
            connector.fetch_image(target)
    assert image_server.hits["/engine-door.png"] == 0
