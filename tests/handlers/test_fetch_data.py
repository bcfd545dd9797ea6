from __future__ import annotations

import base64

import pytest

from handlers.config import FetchSettings
from handlers.errors import FetchForbidden, ImageError, ImageTooLarge
from handlers.fetch import Fetcher, decode_data_uri, parse_s3_url, sniff_media_type
from handlers.formats import FORMATS, ImageFormat
from handlers.imaging import decode_rgb
from tests.images import data_uri, encode, pattern


async def test_data_uri_roundtrip_and_hash() -> None:
    png = encode(pattern(32, 32))
    got = await Fetcher(FetchSettings(), sources={}).fetch(data_uri(png))
    assert got.data == png and got.media_type == "image/png" and len(got.sha256) == 64


def test_data_uri_rejects_non_strict_base64() -> None:
    with pytest.raises(ImageError, match="base64"):
        decode_data_uri("data:image/png;base64,@@@@", 1000)


def test_data_uri_size_cap_checked_before_decoding() -> None:
    payload = base64.b64encode(b"x" * 5000).decode()
    with pytest.raises(ImageTooLarge):
        decode_data_uri(f"data:image/png;base64,{payload}", 1000)


async def test_media_type_comes_from_bytes_not_the_claim() -> None:
    with pytest.raises(ImageError, match="The data: URL does not hold an image"):
        await Fetcher(FetchSettings(), sources={}).fetch(data_uri(b"hello", "image/png"))
    jpeg = encode(pattern(16, 16), "JPEG")
    got = await Fetcher(FetchSettings(), sources={}).fetch(data_uri(jpeg, "image/png"))
    assert got.media_type == "image/jpeg"


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://x/y.png", "gopher://x", "x.png"])
async def test_other_schemes_are_refused(url: str) -> None:
    with pytest.raises(FetchForbidden):
        await Fetcher(FetchSettings(), sources={}).fetch(url)


def test_sniff() -> None:
    assert sniff_media_type(encode(pattern(8, 8), "WEBP")) == "image/webp"
    assert sniff_media_type(encode(pattern(8, 8), "GIF")) == "image/gif"
    assert sniff_media_type(encode(pattern(8, 8), "BMP")) == "image/bmp"


def test_parse_s3_url() -> None:
    assert parse_s3_url("s3://b/k/x.png?versionId=v1") == ("b", "k/x.png", "v1")
    with pytest.raises(ImageError):
        parse_s3_url("s3://bucket-only")


@pytest.mark.parametrize("fmt", FORMATS, ids=[f.label for f in FORMATS])
def test_every_accepted_format_is_sniffed_and_decoded(fmt: ImageFormat) -> None:
    """One list: what the fetcher lets through is what the decoder opens, AVIF included."""
    data = encode(pattern(32, 24, seed=4), fmt.pillow)
    assert sniff_media_type(data) == fmt.media_type
    assert decode_rgb(data).shape == (24, 32, 3)
