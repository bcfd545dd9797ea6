"""What travels between deployments: the prepared image, and the engine's request."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray


@dataclass(frozen=True)
class ImageMeta:
    """The preprocessor's first answer for an image: what it became, without its pixels."""

    uuid: str  # names the exact pixels: content hash and size
    width: int
    height: int


@dataclass(frozen=True)
class PreparedImage:
    """An image ready for the engine. `pixels` (HxWx3 uint8 in the object store) is owned by
    the ingress process that asked for it: it was the return value of the ingress's own
    call, so it lives as long as the ingress holds the reference, whatever happens to the
    preprocessor replica that computed it."""

    meta: ImageMeta
    pixels: ray.ObjectRef

    @property
    def uuid(self) -> str:
        return self.meta.uuid

    @property
    def pixel_count(self) -> int:
        return self.meta.width * self.meta.height


@dataclass(frozen=True)
class ImagePixels:
    """An image's pixels by value (HxWx3 uint8) and the uuid that names them: how images go
    to the encoder. They are small at its size (224x224: ~150 KB) and go inline in the call;
    a reference would make the EmbeddingServer a borrower of the ingress's object, with
    Ray's messages to fetch it and to report when it is done, which cost more CPU than the
    copy (compare-23: embed-fresh 1.17-1.34x req/s)."""

    array: np.ndarray
    uuid: str


@dataclass(frozen=True)
class EngineRequest:
    """One chat request for the engine: vLLM's request body (image URLs blanked, one
    `image_url` part per image, in order), the images, and the key that routes requests
    sharing images to the same engine replica (ImageAffinityRouter)."""

    body: dict[str, Any]
    images: list[PreparedImage] = field(default_factory=list)
    affinity_key: str | None = None
