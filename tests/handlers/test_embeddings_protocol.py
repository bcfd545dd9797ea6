"""/v1/embeddings on the wire: every input shape, every refusal with the field it names, and
responses read back through the openai SDK's own types and base64 decoder."""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

import httpx
import numpy as np
import openai
import pytest
from openai.lib._parsing import _embeddings as sdk_embeddings
from openai.types import CreateEmbeddingResponse, Embedding

from handlers.embeddings import (
    EmbeddingRequest,
    EmbedItem,
    embedding_response,
    encode_embedding,
    parse_embedding_request,
)
from handlers.errors import InvalidRequest

MODEL = "clip"
PNG = "data:image/png;base64,iVBORw0KGgo="
MAX = 8


def parse(input: Any, **extra: Any) -> EmbeddingRequest:
    return parse_embedding_request({"model": MODEL, "input": input, **extra}, MAX)


def refused(body: Any, max_items: int = MAX) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as info:
        parse_embedding_request(body, max_items)
    assert info.value.status == 400 and info.value.type == "invalid_request_error"
    return info.value


# --- requests -------------------------------------------------------------------------------


def test_a_string_is_one_text_item() -> None:
    req = parse("a cat")
    assert req.model == MODEL and req.encoding_format == "float" and req.dimensions is None
    assert req.items == [EmbedItem("text", 0, "input", text="a cat")]


def test_a_list_of_strings_is_one_item_each() -> None:
    req = parse(["a cat", "a dog"])
    assert [(i.kind, i.index, i.param, i.text) for i in req.items] == [
        ("text", 0, "input[0]", "a cat"), ("text", 1, "input[1]", "a dog")]


def test_a_flat_token_list_is_one_item_and_a_list_of_lists_one_each() -> None:
    flat = parse([49406, 320, 2368, 49407])
    assert flat.items == [EmbedItem("tokens", 0, "input", tokens=(49406, 320, 2368, 49407))]
    # A flat token list is one item however long: max_items counts items.
    assert len(parse(list(range(MAX * 4))).items) == 1
    nested = parse([[1, 2], [3]])
    assert [(i.kind, i.param, i.tokens) for i in nested.items] == [
        ("tokens", "input[0]", (1, 2)), ("tokens", "input[1]", (3,))]


def test_parts_and_strings_mix_in_every_image_spelling() -> None:
    req = parse([
        "plain",
        {"type": "text", "text": "a text part"},
        {"type": "input_text", "text": "a responses-style part"},
        {"type": "image_url", "image_url": {"url": PNG, "detail": "low"}},
        {"type": "image_url", "image_url": "https://example.com/a.png"},
        {"type": "input_image", "image_url": PNG, "detail": "high"},
        [7, 8],
    ])
    assert [(i.kind, i.index, i.param) for i in req.items] == [
        ("text", 0, "input[0]"),
        ("text", 1, "input[1].text"),
        ("text", 2, "input[2].text"),
        ("image", 3, "input[3].image_url"),
        ("image", 4, "input[4].image_url"),
        ("image", 5, "input[5].image_url"),
        ("tokens", 6, "input[6]"),
    ]
    assert [i.text for i in req.items[:3]] == ["plain", "a text part", "a responses-style part"]
    assert [(i.url, i.detail) for i in req.images] == [
        (PNG, "low"), ("https://example.com/a.png", "auto"), (PNG, "high")]


def test_format_dimensions_and_ignored_fields() -> None:
    req = parse("x", encoding_format="base64", dimensions=32, user="u-1", future={"k": 1})
    assert req.encoding_format == "base64" and req.dimensions == 32
    assert parse("x", encoding_format=None).encoding_format == "float"


def test_items_are_immutable() -> None:
    item = parse([[1, 2]]).items[0]
    with pytest.raises(AttributeError):
        item.text = "changed"  # type: ignore[misc]
    assert isinstance(item.tokens, tuple)


def body(input: Any, **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "input": input, **extra}


BAD: list[tuple[str, Any, str | None]] = [
    ("not-an-object", ["a"], None),
    ("no-model", {"input": "a"}, "model"),
    ("model-not-a-string", {"model": 3, "input": "a"}, "model"),
    ("no-input", {"model": MODEL}, "input"),
    ("input-null", body(None), "input"),
    ("input-a-number", body(5), "input"),
    ("input-an-object", body({"text": "a"}), "input"),
    # OpenAI refuses empty strings; so does Iris, wherever the text sits.
    ("empty-string", body(""), "input"),
    ("empty-list", body([]), "input"),
    ("empty-string-in-list", body(["a", ""]), "input[1]"),
    ("string-in-flat-token-list", body([1, "a"]), "input[1]"),
    ("negative-token", body([1, -2]), "input[1]"),
    ("boolean-token", body([1, True]), "input[1]"),
    ("float-token", body([[1, 2.5]]), "input[0][1]"),
    ("empty-token-list", body([[1, 2], []]), "input[1]"),
    ("null-item", body(["a", None]), "input[1]"),
    ("part-without-type", body(["a", {"text": "x"}]), "input[1]"),
    ("unknown-part-type", body(["a", "b", "c", {"type": "input_audio"}]), "input[3].type"),
    ("text-part-without-text", body([{"type": "text"}]), "input[0].text"),
    ("empty-text-part", body([{"type": "text", "text": ""}]), "input[0].text"),
    ("empty-image-url", body(["a", "b", {"type": "image_url", "image_url": {"url": ""}}]),
     "input[2].image_url.url"),
    ("empty-bare-image-url", body([{"type": "image_url", "image_url": ""}]),
     "input[0].image_url"),
    ("image-url-missing-url", body([{"type": "image_url", "image_url": {}}]),
     "input[0].image_url.url"),
    ("image-url-not-a-string", body([{"type": "image_url", "image_url": {"url": 5}}]),
     "input[0].image_url.url"),
    ("image-url-wrong-type", body([{"type": "image_url", "image_url": 5}]),
     "input[0].image_url"),
    ("bad-detail", body([{"type": "image_url", "image_url": {"url": PNG, "detail": "ultra"}}]),
     "input[0].image_url.detail"),
    ("input-image-file-id", body([{"type": "input_image", "file_id": "file-1"}]),
     "input[0].file_id"),
    ("bad-encoding-format", body("a", encoding_format="hex"), "encoding_format"),
    ("zero-dimensions", body("a", dimensions=0), "dimensions"),
    ("string-dimensions", body("a", dimensions="8"), "dimensions"),
    ("boolean-dimensions", body("a", dimensions=True), "dimensions"),
]


@pytest.mark.parametrize(("case", "payload", "param"), BAD, ids=[b[0] for b in BAD])
def test_refusals_name_the_field(case: str, payload: Any, param: str | None) -> None:
    err = refused(payload)
    assert err.param == param, err.message
    assert err.code is None
    # The message names the field too (clients often show only the message).
    if param is not None:
        assert param in err.message


def test_too_many_items_is_refused_before_any_item_is_read() -> None:
    err = refused(body(["a"] * MAX + [None]))
    assert (err.param, err.code) == ("input", "too_many_inputs")
    assert str(MAX) in err.message
    assert parse(["a"] * MAX).items[-1].index == MAX - 1


# --- responses ------------------------------------------------------------------------------


def sdk_decode(data: str) -> list[float]:
    """The openai SDK's own decoding of a base64 embedding (its post-parser, as run when the
    caller did not ask for a format)."""
    resp = CreateEmbeddingResponse.model_construct(
        object="list", model=MODEL, usage=None,
        data=[Embedding.model_construct(object="embedding", index=0, embedding=data)])
    parsed = sdk_embeddings.parse_embedding_response(resp, encoding_format=openai.omit)
    out: list[float] = parsed.data[0].embedding
    return out


def test_base64_is_little_endian_float32() -> None:
    assert encode_embedding([1.0, -2.0], "base64") == base64.b64encode(
        b"\x00\x00\x80\x3f\x00\x00\x00\xc0").decode()


@pytest.mark.parametrize("numpy_present", [True, False])
def test_base64_round_trips_through_the_sdk_decoder(
    monkeypatch: pytest.MonkeyPatch, numpy_present: bool
) -> None:
    # The SDK decodes with numpy.frombuffer(float32), or array("f") without numpy.
    monkeypatch.setattr(sdk_embeddings, "has_numpy", lambda: numpy_present)
    vector = [0.1, -0.25, 3.0e-8, 1234.5678, 0.0, -1.0]
    encoded = encode_embedding(vector, "base64")
    assert isinstance(encoded, str)
    assert sdk_decode(encoded) == np.asarray(vector, dtype=np.float32).tolist()


def test_float_format_is_plain_floats() -> None:
    out = encode_embedding(np.asarray([0.5, 0.25], dtype=np.float32).tolist(), "float")
    assert out == [0.5, 0.25] and all(type(v) is float for v in out)


@pytest.mark.parametrize("fmt", ["float", "base64"])
def test_response_shape(fmt: Any) -> None:
    vectors = [[0.6, 0.8], [1.0, 0.0], [0.0, -1.0]]
    out = embedding_response(vectors, MODEL, prompt_tokens=11, encoding_format=fmt)
    assert out["object"] == "list" and out["model"] == MODEL
    assert out["usage"] == {"prompt_tokens": 11, "total_tokens": 11}
    assert [d["index"] for d in out["data"]] == [0, 1, 2]
    assert {d["object"] for d in out["data"]} == {"embedding"}
    if fmt == "float":
        parsed = CreateEmbeddingResponse.model_validate(out)
        assert [d.embedding for d in parsed.data] == vectors
    else:
        decoded = [sdk_decode(d["embedding"]) for d in out["data"]]
        assert decoded == np.asarray(vectors, dtype=np.float32).tolist()
        # Once decoded, the SDK's type accepts it.
        CreateEmbeddingResponse.model_validate(
            {**out, "data": [{**d, "embedding": v} for d, v in zip(out["data"], decoded,
                                                                     strict=True)]})


def fake_vector(item: EmbedItem) -> list[float]:
    """A deterministic unit vector per item content."""
    key = repr((item.kind, item.text, item.tokens, item.url)).encode()
    rng = np.random.default_rng(int.from_bytes(hashlib.sha256(key).digest()[:8], "little"))
    v = rng.standard_normal(16)
    return (v / np.linalg.norm(v)).tolist()


def sdk_client(seen: list[EmbeddingRequest]) -> openai.OpenAI:
    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v1/embeddings"
        req = parse_embedding_request(json.loads(request.content), MAX)
        seen.append(req)
        vectors = [fake_vector(i) for i in req.items]
        return httpx.Response(200, json=embedding_response(
            vectors, req.model, prompt_tokens=len(req.items), encoding_format=req.encoding_format))

    return openai.OpenAI(base_url="http://test/v1", api_key="x", max_retries=0,
                         http_client=httpx.Client(transport=httpx.MockTransport(handler)))


def test_the_sdk_default_request_asks_base64_and_decodes_our_answer() -> None:
    seen: list[EmbeddingRequest] = []
    client = sdk_client(seen)
    res = client.embeddings.create(model=MODEL, input=["a cat", "a dog"])
    assert seen[0].encoding_format == "base64"  # what the SDK asks for by default
    expected = [np.asarray(fake_vector(i), dtype=np.float32).tolist() for i in seen[0].items]
    assert [d.embedding for d in res.data] == expected
    assert res.usage.prompt_tokens == 2 and res.model == MODEL


def test_the_sdk_float_request_and_token_and_image_items() -> None:
    seen: list[EmbeddingRequest] = []
    client = sdk_client(seen)
    tokens = client.embeddings.create(model=MODEL, input=[[1, 2, 3], [4]],
                                      encoding_format="float")
    assert [i.tokens for i in seen[0].items] == [(1, 2, 3), (4,)]
    assert [d.embedding for d in tokens.data] == [fake_vector(i) for i in seen[0].items]
    images = client.embeddings.create(
        model=MODEL, input=[],
        extra_body={"input": ["a cat", {"type": "image_url", "image_url": {"url": PNG}}]})
    assert [i.kind for i in seen[1].items] == ["text", "image"]
    assert [d.index for d in images.data] == [0, 1]
