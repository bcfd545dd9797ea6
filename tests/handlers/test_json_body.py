from __future__ import annotations

import base64
import json
import os

import pytest

from handlers import json_body

URI = "data:image/jpeg;base64," + base64.b64encode(os.urandom(200_000)).decode()


def chat(*urls: str, text: str = "Describe this image.") -> dict:
    parts = [{"type": "image_url", "image_url": {"url": u, "detail": "auto"}} for u in urls]
    return {"model": "m", "stream": True, "max_tokens": 8,
            "messages": [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]}


def test_long_data_uris_skip_the_parser_and_come_back_unchanged() -> None:
    body = chat(URI, "https://example.com/a.png", URI[:-4] + "AAAA")
    raw = json.dumps(body).encode()
    small, lifted = json_body.lift(raw)
    assert len(lifted) == 2 and len(small) < 1000
    assert sorted(lifted.values()) == sorted([URI, URI[:-4] + "AAAA"])
    assert json_body.loads(raw) == body


@pytest.mark.parametrize("raw", [
    # In another string (escaped quotes): text, not a URI to lift.
    json.dumps(chat(text=f'"{URI}"')).encode(),
    # Escaped slashes (PHP's json_encode writes them): json has to unescape.
    json.dumps(chat(URI)).replace("/", "\\/").encode(),
    # Non-ASCII inside.
    json.dumps(chat(URI[:100] + "é" + URI[100:]), ensure_ascii=False).encode(),
    # Short ones are cheap for json anyway.
    json.dumps(chat(URI[:1000])).encode(),
])
def test_uris_json_must_read_itself_are_left_to_it(raw: bytes) -> None:
    assert json_body.lift(raw)[1] == {}
    assert json_body.loads(raw) == json.loads(raw)


def test_same_result_as_json_for_keys_odd_layouts_and_lookalikes() -> None:
    lookalike = "iris-lifted-0000000000000000-0"
    for body in ({URI: 1, "x": [URI, {"y": URI}]}, [URI], URI,
                 chat(URI, text=lookalike), {"a": "\\", "b": URI}):
        raw = json.dumps(body, indent=1).encode()
        assert json_body.lift(raw)[1], body
        assert json_body.loads(raw) == body


@pytest.mark.parametrize("raw", [
    b'{"a": "x"' + URI.encode() + b'"}',  # a closing quote, then the URI's text
    b'{"a": ' + URI.encode()[5:] + b"}",  # unquoted
    b'{"a": "' + URI.encode(),  # never closed
    b'{"a": "' + URI.encode() + b'" "b"}',  # two strings in a row
])
def test_invalid_json_stays_invalid(raw: bytes) -> None:
    with pytest.raises(ValueError):
        json.loads(raw)
    with pytest.raises(ValueError):
        json_body.loads(raw)
