"""What travels between deployments: the prepared image, and the engine's request."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

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
class EngineRequest:
    """One chat request for the engine: vLLM's request body (image URLs blanked, one
    `image_url` part per image, in order), the images, and the key that routes requests
    sharing images to the same engine replica (ImageAffinityRouter)."""

    body: dict[str, Any]
    images: list[PreparedImage] = field(default_factory=list)
    affinity_key: str | None = None
