"""POST /v1/responses through the running app, driven by the openai SDK as the AI SDK,
Pydantic AI and the Agents SDK drive it: images through Iris's own fetcher, streaming with
the event sequence `responses.stream()` accepts, and a clear 400 for stored state."""

from __future__ import annotations

import uuid

import openai
import pytest

from tests.images import data_uri, encode, pattern
from tests.servers import ImageServer
from tests.support import MODEL, assert_envelope, client, post_chat

PNG = encode(pattern(200, 150, seed=41))


def image_input(*urls: str, text: str = "What is in this image?") -> list[dict[str, object]]:
    return [{"role": "user", "content": [
        *({"type": "input_image", "image_url": u, "detail": "auto"} for u in urls),
        {"type": "input_text", "text": text}]}]


def test_create_with_images_from_data_and_http(iris: str, image_server: ImageServer) -> None:
    path = f"/responses-{uuid.uuid4().hex}.png"
    url = image_server.add_bytes(path, PNG)
    resp = client(iris).responses.create(
        model=MODEL, input=image_input(data_uri(PNG), url), instructions="Be brief.",
        max_output_tokens=6, temperature=0.5, top_p=0.9)
    assert resp.status in ("completed", "incomplete") and resp.object == "response"
    assert resp.output and resp.output[0].type == "message"
    assert resp.usage and resp.usage.input_tokens > 2 * 30 and resp.usage.output_tokens >= 1
    assert image_server.hits[path] == 1  # fetched by Iris, once


def test_a_plain_string_input(iris: str) -> None:
    resp = client(iris).responses.create(model=MODEL, input="Say hi.", max_output_tokens=3)
    assert resp.output_text is not None and resp.model == MODEL


def test_stream_events_the_sdk_accepts(iris: str) -> None:
    with client(iris).responses.stream(model=MODEL, input=image_input(data_uri(PNG)),
                                       max_output_tokens=8) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_response() if kinds[-1] == "response.completed" else None
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert "response.output_text.delta" in kinds
    assert kinds[-1] in ("response.completed", "response.incomplete")
    if final is not None:
        assert final.usage and final.usage.output_tokens >= 1


def test_structured_output_through_text_format(iris: str) -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"],
              "additionalProperties": False}
    resp = client(iris).responses.create(
        model=MODEL, input="Give me a number.", max_output_tokens=40,
        text={"format": {"type": "json_schema", "name": "n", "schema": schema,
                         "strict": True}})
    assert resp.output and resp.output[0].type == "message"


@pytest.mark.parametrize(("extra", "param"), [
    ({"previous_response_id": "resp_123"}, "previous_response_id"),
    ({"store": True}, "store"),
])
def test_stored_state_is_refused_clearly(iris: str, extra: dict[str, object],
                                         param: str) -> None:
    resp = post_chat(iris, {"model": MODEL, "input": "hi", **extra}, path="/responses")
    err = assert_envelope(resp, 400)
    assert err["param"] == param and "no state" in err["message"]
    with pytest.raises(openai.BadRequestError):
        client(iris).responses.create(model=MODEL, input="hi", **extra)


def test_errors_name_the_responses_field(iris: str) -> None:
    resp = post_chat(iris, {"model": MODEL, "input": image_input("file:///etc/passwd")},
                     path="/responses")
    err = assert_envelope(resp, 400)
    assert err["param"].startswith("input[0].content[0]"), err
    assert_envelope(post_chat(iris, {"model": "nope", "input": "hi"}, path="/responses"), 404)
