"""The image formats Iris accepts: one list, and one rule for telling them from the bytes
(never from a header or a file name). The fetcher sniffs with it; the decoder opens only
these formats."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


def _isobmff_brands(data: bytes) -> set[bytes]:
    """The major and compatible brands of an ISO base media file's leading ftyp box."""
    if data[4:8] != b"ftyp":
        return set()
    size = min(int.from_bytes(data[:4], "big"), len(data), 256)
    brands = {data[8:12]}
    brands.update(data[i:i + 4] for i in range(16, size - 3, 4))
    return brands


@dataclass(frozen=True)
class ImageFormat:
    pillow: str  # Pillow's name for the format (what Image.open(formats=...) takes)
    media_type: str
    label: str
    matches: Callable[[bytes], bool]


FORMATS: tuple[ImageFormat, ...] = (
    ImageFormat("JPEG", "image/jpeg", "JPEG", lambda d: d.startswith(b"\xff\xd8\xff")),
    ImageFormat("PNG", "image/png", "PNG", lambda d: d.startswith(b"\x89PNG\r\n\x1a\n")),
    ImageFormat("WEBP", "image/webp", "WebP", lambda d: d[:4] == b"RIFF" and d[8:12] == b"WEBP"),
    ImageFormat("GIF", "image/gif", "GIF", lambda d: d[:6] in (b"GIF87a", b"GIF89a")),
    ImageFormat("BMP", "image/bmp", "BMP", lambda d: d.startswith(b"BM")),
    ImageFormat("TIFF", "image/tiff", "TIFF", lambda d: d[:4] in (b"II*\x00", b"MM\x00*")),
    ImageFormat("AVIF", "image/avif", "AVIF",
                lambda d: bool({b"avif", b"avis"} & _isobmff_brands(d))),
)

PILLOW_FORMATS: tuple[str, ...] = tuple(f.pillow for f in FORMATS)
# "JPEG, PNG, WebP, GIF, BMP, TIFF or AVIF", for messages.
NAMES = ", ".join(f.label for f in FORMATS[:-1]) + " or " + FORMATS[-1].label


def sniff_media_type(data: bytes) -> str | None:
    """The media type the bytes are in, if it is one Iris accepts."""
    for fmt in FORMATS:
        if fmt.matches(data):
            return fmt.media_type
    return None
