"""Wire models the ingress needs. Full chat validation is vLLM's ChatCompletionRequest,
run in the engine replica; here we only check what the ingress acts on (model, stream,
messages and their image parts) and give errors that name the offending field."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from handlers.errors import InvalidRequest

M = TypeVar("M", bound=BaseModel)

# OpenAI's `detail` (the current SDKs add "original": full resolution, within the caps).
Detail = Literal["auto", "low", "high", "original"]


class ImageURL(BaseModel):
    # Keys OpenAI does not define are ignored, as OpenAI and vLLM do.
    model_config = ConfigDict(extra="ignore")
    url: str
    detail: Detail | None = "auto"


class ImageURLPart(BaseModel):
    """Chat's image part. (`image_url` may also be the URL itself: ImageURLStringPart.)"""

    model_config = ConfigDict(extra="allow")
    type: Literal["image_url"]
    image_url: ImageURL


class ImageURLStringPart(BaseModel):
    """Chat's image part with the URL as `image_url` itself, which vLLM accepts."""

    model_config = ConfigDict(extra="allow")
    type: Literal["image_url"]
    image_url: str


class InputImagePart(BaseModel):
    """The Responses API's image part, which clients also send inside chat messages."""

    model_config = ConfigDict(extra="allow")
    type: Literal["input_image"]
    image_url: str | None = None
    file_id: str | None = None
    detail: Detail | None = "auto"


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool | None = None


class ChatEnvelope(BaseModel):
    """The fields of a chat request the ingress reads; the rest passes through."""

    model_config = ConfigDict(extra="allow")
    model: str
    messages: list[dict[str, Any]]
    stream: bool | None = False
    stream_options: StreamOptions | None = None


@dataclass(frozen=True)
class ImageRef:
    """One image of a request: what it points at, and the field that holds it (for errors)."""

    url: str
    detail: Detail
    param: str  # e.g. messages[0].content[1].image_url


KNOWN_ROLES = {"system", "developer", "user", "assistant", "tool", "function"}


def _loc(prefix: str, loc: tuple[Any, ...]) -> str:
    out = prefix
    for item in loc:
        out += f"[{item}]" if isinstance(item, int) else (f".{item}" if out else str(item))
    return out


def validation_message(exc: ValidationError, prefix: str = "") -> tuple[str, str]:
    """First pydantic error as (message, param)."""
    err = exc.errors()[0]
    param = _loc(prefix, tuple(err.get("loc", ())))
    return f"{param or 'body'}: {err.get('msg', 'invalid value')}", param


def validated(model: type[M], body: Any) -> M:
    """A JSON object body as `model`; InvalidRequest naming the first offending field."""
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        msg, param = validation_message(exc)
        raise InvalidRequest(msg, param=param) from None


def parse_envelope(body: Any) -> ChatEnvelope:
    env = validated(ChatEnvelope, body)
    if not env.messages:
        raise InvalidRequest("messages must contain at least one message.", param="messages")
    return env


# Content part types the engine may see, by what carries their text. Everything else is
# refused: vLLM would fetch the URL of a video_url / audio_url / input_image part itself,
# around Iris's fetcher and its rules (and it reads media keys on any part with a uuid).
TEXT_PARTS = {"text": "text", "input_text": "text", "output_text": "text", "refusal": "refusal"}
IMAGE_PARTS = frozenset({"image_url", "input_image"})


def image_part(part: dict[str, Any], prefix: str) -> tuple[str, Detail]:
    """(url, detail) of an image part in any of its spellings; names the field on error."""
    try:
        if part["type"] == "input_image":
            img = InputImagePart.model_validate(part)
            if img.image_url is None:
                field = "file_id" if img.file_id is not None else "image_url"
                raise InvalidRequest(
                    f"{prefix}.{field}: Iris keeps no files; send the image as image_url (a URL "
                    "or a data: URI).", param=f"{prefix}.{field}")
            return img.image_url, img.detail or "auto"
        if isinstance(part.get("image_url"), str):
            return ImageURLStringPart.model_validate(part).image_url, "auto"
        p = ImageURLPart.model_validate(part)
    except ValidationError as exc:
        msg, param = validation_message(exc, prefix)
        raise InvalidRequest(msg, param=param) from None
    return p.image_url.url, p.image_url.detail or "auto"


def _text_part(part: dict[str, Any], prefix: str) -> dict[str, Any]:
    """The part rebuilt from its known fields only: no extra key reaches the engine."""
    kind = part["type"]
    field = TEXT_PARTS[kind]
    value = part.get(field)
    if not isinstance(value, str):
        raise InvalidRequest(f"{prefix}.{field} must be a string.", param=f"{prefix}.{field}")
    return {"type": kind, field: value}


def extract_images(
    messages: list[dict[str, Any]], max_images: int
) -> tuple[list[dict[str, Any]], list[ImageRef]]:
    """Check every message's content parts, naming the field on error.

    Returns the messages as the engine may see them (every content part rebuilt from its
    known fields, image URLs blanked: the engine gets pixels by reference) and the images."""
    refs: list[ImageRef] = []
    out: list[dict[str, Any]] = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise InvalidRequest(f"messages[{i}] must be an object.", param=f"messages[{i}]")
        role = msg.get("role")
        if role not in KNOWN_ROLES:
            raise InvalidRequest(
                f"messages[{i}].role must be one of {sorted(KNOWN_ROLES)}.",
                param=f"messages[{i}].role",
            )
        content = msg.get("content")
        if content is None or isinstance(content, str):
            out.append(msg)
            continue
        if not isinstance(content, list):
            raise InvalidRequest(
                f"messages[{i}].content must be a string or a list of content parts.",
                param=f"messages[{i}].content",
            )
        parts: list[dict[str, Any]] = []
        for j, part in enumerate(content):
            prefix = f"messages[{i}].content[{j}]"
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise InvalidRequest(f"{prefix} must be an object with a type.", param=prefix)
            kind = part["type"]
            if kind in TEXT_PARTS:
                parts.append(_text_part(part, prefix))
                continue
            if kind not in IMAGE_PARTS:
                raise InvalidRequest(
                    f"{prefix}.type {kind!r} is not supported: content parts may be "
                    f"{', '.join(sorted(TEXT_PARTS))}, image_url or input_image.",
                    param=f"{prefix}.type",
                )
            url, detail = image_part(part, prefix)
            refs.append(ImageRef(url, detail, f"{prefix}.image_url"))
            parts.append({"type": "image_url", "image_url": {"url": ""}})
        out.append({**msg, "content": parts})
    if len(refs) > max_images:
        raise InvalidRequest(
            f"The request has {len(refs)} images; at most {max_images} are allowed.",
            param="messages",
            code="too_many_images",
        )
    return out, refs


def model_card(model_id: str, root: str, created: int | None = None) -> dict[str, Any]:
    return {
        "id": model_id,
        "object": "model",
        "created": created or int(time.time()),
        "owned_by": "iris",
        "root": root,
        "parent": None,
    }


def model_list(model_ids: list[str], created: int | None = None) -> dict[str, Any]:
    return {"object": "list", "data": [model_card(m, m, created) for m in model_ids]}
