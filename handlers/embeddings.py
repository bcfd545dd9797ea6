"""POST /v1/embeddings on the wire, for a CLIP-style encoder where each input item is one text
or one image.

`input` takes OpenAI's shapes: a string, a list of strings, a list of token ids (one item) or
a list of token-id lists. Iris adds image items: a list element may be a chat-style content
part, `{"type": "image_url", "image_url": {"url", "detail"?}}` (or any spelling
`handlers.protocol.image_part` accepts: a bare-string `image_url`, `input_image`) or
`{"type": "text" | "input_text", "text"}`, mixed freely with strings and token lists.

Decisions:
- Empty strings (and empty text parts, empty token lists, empty image URLs) are refused, as
  OpenAI refuses empty strings: an encoder's vector for "nothing" is meaningless.
- Token ids must be JSON integers >= 0 (not booleans, not floats); the engine checks them
  against its vocabulary.
- `dimensions` is only parsed (a positive integer); whether the model supports it is the
  engine's call. `user` and keys OpenAI does not define are ignored.
- A flat list of token ids is ONE item; `max_items` counts items, and the count is checked
  before any item is read.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictInt

from handlers.errors import InvalidRequest
from handlers.protocol import Detail, image_part, validated

EncodingFormat = Literal["float", "base64"]
ItemKind = Literal["text", "tokens", "image"]

# Part types an embedding item may be, by kind.
TEXT_PART_TYPES = frozenset({"text", "input_text"})
IMAGE_PART_TYPES = frozenset({"image_url", "input_image"})


@dataclass(frozen=True)
class EmbedItem:
    """One input item: one vector in the response, at `index`.

    kind "text": `text` is set; "tokens": `tokens` (the ids, as a tuple); "image": `url` and
    `detail`. `param` names the item in the request (`input`, `input[3]`, or for an image
    `input[2].image_url`, ready for `IrisError.with_param` on a fetch error)."""

    kind: ItemKind
    index: int
    param: str
    text: str | None = None
    tokens: tuple[int, ...] | None = None
    url: str | None = None
    detail: Detail | None = None


class _EmbeddingBody(BaseModel):
    """The top-level fields, checked before `input` is read item by item."""

    model_config = ConfigDict(extra="ignore")
    model: str
    input: Any
    encoding_format: EncodingFormat | None = "float"
    dimensions: StrictInt | None = Field(None, gt=0)


class EmbeddingRequest(BaseModel):
    """A parsed /v1/embeddings request."""

    model_config = ConfigDict(frozen=True)
    model: str
    items: list[EmbedItem]
    encoding_format: EncodingFormat = "float"
    dimensions: int | None = None

    @property
    def images(self) -> list[EmbedItem]:
        """The image items, in request order."""
        return [item for item in self.items if item.kind == "image"]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _token_ids(values: list[Any], param: str) -> tuple[int, ...]:
    if not values:
        raise InvalidRequest(f"{param} must not be an empty list of token ids.", param=param)
    for j, value in enumerate(values):
        if not _is_int(value) or value < 0:
            raise InvalidRequest(
                f"{param}[{j}] must be a token id (an integer >= 0).", param=f"{param}[{j}]"
            )
    return tuple(values)


def _text(value: str, param: str, index: int) -> EmbedItem:
    if not value:
        raise InvalidRequest(f"{param} must not be an empty string.", param=param)
    return EmbedItem("text", index, param, text=value)


# pydantic names the member of a union in an error's location ("image_url.ImageURL.url");
# the client's JSON has no such level.
_UNION_TAG = re.compile(r"\.(?:ImageURL|str)(?=[.:\s]|$)")


def image_item(part: dict[str, Any], prefix: str) -> tuple[str, Detail, str]:
    """(url, detail, param) of an image part at `prefix`, in any spelling `image_part` takes;
    param is `{prefix}.image_url`. Refuses an empty URL, naming where it sits."""
    try:
        url, detail = image_part(part, prefix)
    except InvalidRequest as exc:
        exc.message = _UNION_TAG.sub("", exc.message)
        exc.param = _UNION_TAG.sub("", exc.param) if exc.param else exc.param
        raise
    if not url:
        nested = part["type"] == "image_url" and isinstance(part.get("image_url"), dict)
        where = f"{prefix}.image_url.url" if nested else f"{prefix}.image_url"
        raise InvalidRequest(f"{where} must not be empty.", param=where)
    return url, detail, f"{prefix}.image_url"


def _part(part: dict[str, Any], index: int) -> EmbedItem:
    prefix = f"input[{index}]"
    kind = part.get("type")
    if not isinstance(kind, str):
        raise InvalidRequest(f"{prefix} must be an object with a type.", param=prefix)
    if kind in TEXT_PART_TYPES:
        text = part.get("text")
        if not isinstance(text, str):
            raise InvalidRequest(f"{prefix}.text must be a string.", param=f"{prefix}.text")
        return _text(text, f"{prefix}.text", index)
    if kind in IMAGE_PART_TYPES:
        url, detail, param = image_item(part, prefix)
        return EmbedItem("image", index, param, url=url, detail=detail)
    raise InvalidRequest(
        f"{prefix}.type {kind!r} is not supported: an item is a string, a list of token ids, "
        f"or a part of type {', '.join(sorted(TEXT_PART_TYPES | IMAGE_PART_TYPES))}.",
        param=f"{prefix}.type",
    )


def _item(value: Any, index: int) -> EmbedItem:
    param = f"input[{index}]"
    if isinstance(value, str):
        return _text(value, param, index)
    if isinstance(value, list):
        return EmbedItem("tokens", index, param, tokens=_token_ids(value, param))
    if isinstance(value, dict):
        return _part(value, index)
    raise InvalidRequest(
        f"{param} must be a string, a list of token ids, or a text or image_url part.",
        param=param,
    )


def _items(value: Any, max_items: int) -> list[EmbedItem]:
    if isinstance(value, str):
        return [_text(value, "input", 0)]
    if not isinstance(value, list):
        raise InvalidRequest(
            "input must be a string, a list of strings, a list of token ids, a list of "
            "token-id lists, or a list of text and image_url parts.",
            param="input",
        )
    if not value:
        raise InvalidRequest("input must not be an empty list.", param="input")
    if _is_int(value[0]):
        # OpenAI's "array of tokens": the whole list is one item.
        return [EmbedItem("tokens", 0, "input", tokens=_token_ids(value, "input"))]
    if len(value) > max_items:
        raise InvalidRequest(
            f"input has {len(value)} items; at most {max_items} are allowed.",
            param="input",
            code="too_many_inputs",
        )
    return [_item(v, i) for i, v in enumerate(value)]


def parse_embedding_request(body: Any, max_items: int) -> EmbeddingRequest:
    """The request, every item checked; InvalidRequest names the offending field."""
    env = validated(_EmbeddingBody, body)
    items = _items(env.input, max_items)
    return EmbeddingRequest(
        model=env.model,
        items=items,
        encoding_format=env.encoding_format or "float",
        dimensions=env.dimensions,
    )


def encode_embedding(
    vector: Sequence[float], encoding_format: EncodingFormat
) -> list[float] | str:
    """The vector as the response carries it: floats, or base64 of little-endian float32
    bytes (what the openai SDK decodes with numpy.frombuffer(..., "float32"))."""
    if encoding_format == "base64":
        raw = np.asarray(vector, dtype="<f4").tobytes()
        return base64.b64encode(raw).decode("ascii")
    return [float(v) for v in vector]


def embedding_response(
    vectors: Sequence[Sequence[float]],
    model: str,
    prompt_tokens: int,
    encoding_format: EncodingFormat,
) -> dict[str, Any]:
    """OpenAI's CreateEmbeddingResponse; vectors in item order (index i is items[i])."""
    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": encode_embedding(v, encoding_format)}
            for i, v in enumerate(vectors)
        ],
        "model": model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }
