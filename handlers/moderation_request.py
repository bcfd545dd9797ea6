"""POST /v1/moderations' request: OpenAI's omni-moderation `input` parsed into the texts and
images to embed, grouped by the result each one counts towards.

`input` is a string (one result), a list of strings (one result each), or a list of
`{"type": "text", "text"}` / `{"type": "image_url", "image_url": {"url"}}` parts (ONE result
for the whole list, as OpenAI does). `model` is optional. Empty strings, empty lists, lists
mixing strings with parts, and unknown part types are refused, naming the field.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict

from handlers.embeddings import IMAGE_PART_TYPES, TEXT_PART_TYPES, image_item
from handlers.errors import InvalidRequest
from handlers.moderation import InputKind
from handlers.protocol import Detail, validated


@dataclass(frozen=True)
class ModerationPart:
    """One text or image to embed. `param` names it in the request (`input`, `input[2]`, or
    for an image `input[1].image_url`, ready for `IrisError.with_param`)."""

    kind: InputKind
    param: str
    text: str | None = None
    url: str | None = None
    detail: Detail | None = None


@dataclass(frozen=True)
class ModerationInput:
    """What one result is computed from: one string, or all the parts of a multimodal list."""

    parts: tuple[ModerationPart, ...]


class ModerationRequest(BaseModel):
    model_config = ConfigDict(frozen=True)
    model: str | None = None
    inputs: list[ModerationInput]

    @property
    def parts(self) -> list[ModerationPart]:
        """Every part of every input, in request order."""
        return [p for inp in self.inputs for p in inp.parts]


class _ModerationBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    input: Any


def _text_part(value: str, param: str) -> ModerationPart:
    if not value:
        raise InvalidRequest(f"{param} must not be an empty string.", param=param)
    return ModerationPart("text", param, text=value)


def _mm_part(part: Any, index: int) -> ModerationPart:
    prefix = f"input[{index}]"
    if not isinstance(part, dict) or not isinstance(part.get("type"), str):
        raise InvalidRequest(
            f"{prefix} must be a text or image_url part (a list of parts cannot mix in "
            "strings).",
            param=prefix,
        )
    kind = part["type"]
    if kind in TEXT_PART_TYPES:
        text = part.get("text")
        if not isinstance(text, str):
            raise InvalidRequest(f"{prefix}.text must be a string.", param=f"{prefix}.text")
        return _text_part(text, f"{prefix}.text")
    if kind in IMAGE_PART_TYPES:
        url, detail, param = image_item(part, prefix)
        return ModerationPart("image", param, url=url, detail=detail)
    raise InvalidRequest(
        f"{prefix}.type {kind!r} is not supported: parts may be text or image_url.",
        param=f"{prefix}.type",
    )


def _inputs(value: Any, max_items: int) -> list[ModerationInput]:
    if isinstance(value, str):
        return [ModerationInput((_text_part(value, "input"),))]
    if not isinstance(value, list):
        raise InvalidRequest(
            "input must be a string, a list of strings, or a list of text and image_url parts.",
            param="input",
        )
    if not value:
        raise InvalidRequest("input must not be an empty list.", param="input")
    if len(value) > max_items:
        raise InvalidRequest(
            f"input has {len(value)} items; at most {max_items} are allowed.",
            param="input",
            code="too_many_inputs",
        )
    if any(isinstance(v, dict) for v in value):
        return [ModerationInput(tuple(_mm_part(v, i) for i, v in enumerate(value)))]
    out: list[ModerationInput] = []
    for i, v in enumerate(value):
        if not isinstance(v, str):
            raise InvalidRequest(
                f"input[{i}] must be a string (or every item a text or image_url part).",
                param=f"input[{i}]",
            )
        out.append(ModerationInput((_text_part(v, f"input[{i}]"),)))
    return out


def parse_moderation_request(body: Any, max_items: int) -> ModerationRequest:
    """The request, every part checked; InvalidRequest names the offending field.
    `max_items` caps the strings of a list of strings, or the parts of a multimodal list."""
    env = validated(_ModerationBody, body)
    return ModerationRequest(model=env.model, inputs=_inputs(env.input, max_items))
