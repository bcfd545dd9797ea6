"""What a fetch returns, and how its bytes are judged: media type from the bytes, hash,
strict data: URIs. Shared by every image source."""

from __future__ import annotations

import binascii
import hashlib
import re
from dataclasses import dataclass
from typing import Protocol

import pybase64

from handlers.cache import ImageCache
from handlers.errors import ImageError, ImageTooLarge
from handlers.formats import NAMES, sniff_media_type


@dataclass(frozen=True)
class FetchedImage:
    data: bytes
    media_type: str
    sha256: str


def finish(data: bytes, *, inline: bool = False) -> FetchedImage:
    """The fetched bytes, judged. inline: they came in a data: URI, not from a server."""
    media_type = sniff_media_type(data)
    if media_type is None:
        what = "The data: URL does not hold" if inline else "The URL did not return"
        raise ImageError(f"{what} an image ({NAMES}).")
    return FetchedImage(data, media_type, hashlib.sha256(data).hexdigest())


_DATA_URI = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[^;,]*)*)"
                       r"(?P<b64>;base64)?,", re.IGNORECASE)


def decode_data_uri(url: str, max_bytes: int) -> bytes:
    """Strict base64 `data:` URI decoding with a size cap checked before decoding."""
    m = _DATA_URI.match(url)
    if m is None or not m.group("b64"):
        raise ImageError("A data: image URL must be of the form data:image/<type>;base64,<data>.")
    payload = url[m.end():]
    if len(payload) * 3 // 4 > max_bytes + 3:
        raise ImageTooLarge.over_cap(max_bytes)
    try:
        data = pybase64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageError("The data: URL is not valid base64.") from exc
    if len(data) > max_bytes:
        raise ImageTooLarge.over_cap(max_bytes)
    return data


Cache = ImageCache[FetchedImage]


class Source(Protocol):
    """One way of getting an image (a URL scheme); may use the shared cache."""

    async def get(self, url: str, cache: Cache) -> FetchedImage: ...
