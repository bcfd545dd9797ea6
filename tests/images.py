"""Deterministic test images, made on the spot."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import numpy as np
from PIL import Image


def pattern(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth colour pattern plus seeded noise: real structure, distinct per seed."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack(
        [
            127 + 120 * np.sin(x / (7 + seed % 5) + seed),
            127 + 120 * np.cos(y / (9 + seed % 3)),
            (x + y) * 255 / max(1, width + height),
        ],
        axis=-1,
    )
    noise = rng.normal(0, 12, size=base.shape)
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB")


def encode(img: Image.Image, fmt: str = "PNG", **kwargs: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def natural(width: int, height: int, seed: int = 0) -> Image.Image:
    """Photo-like: a 1/f amplitude spectrum (as natural images have) plus sensor noise."""
    rng = np.random.default_rng(seed)
    fy = np.fft.fftfreq(height)[:, None]
    fx = np.fft.rfftfreq(width)[None, :]
    amp = 1.0 / np.maximum(np.hypot(fx, fy), 1.0 / max(width, height))
    chans = []
    for _ in range(3):
        phase = rng.uniform(0, 2 * np.pi, amp.shape)
        c = np.fft.irfft2(amp * np.exp(1j * phase), s=(height, width))
        chans.append((c - c.mean()) / (c.std() + 1e-9))
    arr = 128 + 45 * np.stack(chans, axis=-1) + rng.normal(0, 4, (height, width, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def text_like(width: int, height: int, seed: int = 0, glyph: int = 32) -> Image.Image:
    """Dark strokes on white in rows of `glyph`-pixel "letters": hard text-like edges."""
    rng = np.random.default_rng(seed)
    arr = np.full((height, width), 250, np.uint8)
    stroke = max(2, glyph // 8)
    for y in range(0, height - glyph, int(glyph * 1.5)):
        for x in range(0, width - glyph, glyph * 2 // 3):
            if rng.random() < 0.7:
                arr[y : y + glyph, x : x + stroke] = 20
            if rng.random() < 0.5:
                yy = y + int(rng.integers(0, glyph - stroke))
                arr[yy : yy + stroke, x : x + glyph // 2] = 20
    return Image.fromarray(arr, "L").convert("RGB")


def gradient(width: int, height: int) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    arr = np.stack([x * 255 / width, y * 255 / height, (x + y) * 255 / (width + height)], -1)
    return Image.fromarray(arr.round().astype(np.uint8), "RGB")


def white_noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


def exif_orientation(value: int) -> bytes:
    """EXIF bytes carrying just an Orientation tag (pass as `exif=` to `encode`)."""
    exif = Image.Exif()
    exif[0x0112] = value
    return exif.tobytes()


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_raw(width: int, height: int, bit_depth: int, colour_type: int, rows: bytes,
            extra: bytes = b"") -> bytes:
    """A PNG from raw filtered scanlines (each row starts with its filter byte)."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + extra
            + png_chunk(b"IDAT", zlib.compress(rows)) + png_chunk(b"IEND", b""))


def png16(arr: np.ndarray) -> bytes:
    """16-bit PNG from an HxW (grey) or HxWx3 (RGB) uint16 array."""
    height, width = arr.shape[:2]
    colour_type = 0 if arr.ndim == 2 else 2
    be = arr.astype(">u2")
    rows = b"".join(b"\x00" + be[y].tobytes() for y in range(height))
    return png_raw(width, height, 16, colour_type, rows)


def png_bomb(side: int = 30000) -> bytes:
    """A valid 1-bit PNG of side x side zeros: ~100 kB that decodes to side**2 pixels."""
    row = b"\x00" * (1 + (side + 7) // 8)
    comp = zlib.compressobj(9)
    body = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", body)
            + png_chunk(b"IEND", b""))
