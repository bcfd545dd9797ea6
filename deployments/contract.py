"""What travels between deployments: the prepared image, and the engine's request."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class ImageMeta:
    """The preprocessor's first answer for an image: what it became, without its pixels."""

    uuid: str  # names the exact pixels: content hash and size
    width: int
    height: int


@dataclass(frozen=True)
class PreparedImage:
    """An image ready for the engine: what it became, and its pixels (HxWx3 uint8) by value.
    They were the return value of the ingress's own call to the preprocessor, so they belong
    to the ingress, whatever happens to the preprocessor replica that computed them; they
    come back inline (objects up to `RAY_max_direct_call_object_size`, 4 MiB here) or, when
    larger, as a zero-copy view of the object store that keeps the object while it lives."""

    meta: ImageMeta
    pixels: np.ndarray

    @property
    def uuid(self) -> str:
        return self.meta.uuid

    @property
    def pixel_count(self) -> int:
        return self.meta.width * self.meta.height


@dataclass(frozen=True)
class ImagePixels:
    """An image's pixels by value (HxWx3 uint8) and the uuid that names them: how images go
    to the encoder, inline in the call (224x224: ~150 KB). A reference would make the
    EmbeddingServer a borrower of the ingress's object, with Ray's messages to fetch it and
    to report when it is done, which cost more CPU than the copy (compare-23: embed-fresh
    1.17-1.34x req/s)."""

    array: np.ndarray
    uuid: str


@dataclass(frozen=True)
class EngineRequest:
    """One chat request for the engine: vLLM's request body (image URLs blanked, one
    `image_url` part per image, in order), the images, and the key that routes requests
    sharing images to the same engine replica (ImageAffinityRouter). In the split layout
    the images travel with the call to LLMServer: inline, or through the object store when
    the call's arguments pass 4 MiB (Ray's rule), owned by the ingress either way."""

    body: dict[str, Any]
    images: list[PreparedImage] = field(default_factory=list)
    affinity_key: str | None = None
