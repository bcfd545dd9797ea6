"""Bytes -> the exact uint8 RGB pixels the model's image processor would patch.

Qwen2-VL's processor (transformers 5, torchvision backend) resizes a uint8 CHW tensor
with torchvision's bicubic + antialias to the `smart_resize` size. We do the same
here, so vLLM's processor finds the image already at its target size and only
normalises and patches it.
"""

from __future__ import annotations

import io
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image, ImageOps

from handlers.errors import ImageError, ImageTooLarge

# We check the pixel count ourselves (from the header, before decoding) and give a 400.
Image.MAX_IMAGE_PIXELS = None

Detail = Literal["auto", "low", "high"]
Fidelity = Literal["exact", "fast"]

MAX_ASPECT_RATIO = 200  # Qwen2-VL's smart_resize refuses anything beyond this.


@dataclass(frozen=True)
class ProcessorGeometry:
    """What the model's image processor needs to know to pick a target size."""

    patch_size: int = 14
    merge_size: int = 2
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    def tokens_for(self, height: int, width: int) -> int:
        """Image placeholder tokens the model uses for an image of this (target) size."""
        return (height // self.patch_size) * (width // self.patch_size) // self.merge_size**2


def _processor_json(model_dir: str | Path) -> dict[str, Any]:
    """The image processor's settings: preprocessor_config.json (most checkpoints) or the
    `image_processor` section of processor_config.json (what transformers 5 writes)."""
    local = Path(model_dir)
    for name in ("preprocessor_config.json", "processor_config.json"):
        path = local / name
        if not local.is_dir():
            # A Hugging Face id: the file comes from the local HF cache (or the hub).
            from huggingface_hub import hf_hub_download

            try:
                path = Path(hf_hub_download(str(model_dir), name))
            except Exception:
                continue
        if path.exists():
            cfg = json.loads(path.read_text())
            return cfg.get("image_processor", cfg)
    raise FileNotFoundError(f"no image processor config found for model {model_dir}")


def load_geometry(model_dir: str | Path) -> ProcessorGeometry:
    """Patch/merge size and pixel bounds from the model's image processor config."""
    cfg = _processor_json(model_dir)
    size = cfg.get("size") or {}
    return ProcessorGeometry(
        patch_size=int(cfg.get("patch_size", 14)),
        merge_size=int(cfg.get("merge_size", 2)),
        min_pixels=int(cfg.get("min_pixels") or size.get("shortest_edge") or 56 * 56),
        max_pixels=int(cfg.get("max_pixels") or size.get("longest_edge") or 28 * 28 * 1280),
    )


def smart_resize(
    height: int, width: int, factor: int, min_pixels: int, max_pixels: int
) -> tuple[int, int]:
    """Qwen2-VL's rule: sides divisible by `factor`, pixels within bounds, aspect kept."""
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ImageError(
            f"Image aspect ratio {width}x{height} is more extreme than the model accepts "
            f"(at most {MAX_ASPECT_RATIO}:1)."
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def pixel_bounds(
    geometry: ProcessorGeometry, detail: Detail, default_detail: str, low_max_pixels: int
) -> tuple[int, int]:
    """(min_pixels, max_pixels) for an OpenAI `detail` level."""
    level = default_detail if detail == "auto" else detail
    if level == "low":
        return geometry.min_pixels, max(geometry.min_pixels, min(low_max_pixels,
                                                                  geometry.max_pixels))
    return geometry.min_pixels, geometry.max_pixels


@dataclass(frozen=True)
class PreparedPixels:
    array: np.ndarray  # HxWx3 uint8, C-contiguous
    source_width: int
    source_height: int

    @property
    def height(self) -> int:
        return int(self.array.shape[0])

    @property
    def width(self) -> int:
        return int(self.array.shape[1])


def open_image(data: bytes, max_decoded_pixels: int) -> Image.Image:
    """Open lazily and check the header's pixel count before any decoding."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(data))
    except Exception as exc:
        raise ImageError("The image could not be decoded: not a supported image format.") from exc
    w, h = img.size
    if w <= 0 or h <= 0:
        raise ImageError("The image has no pixels.")
    if w * h > max_decoded_pixels:
        raise ImageTooLarge(
            f"The image is {w}x{h} ({w * h} pixels); the limit is {max_decoded_pixels} pixels."
        )
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """Any mode -> RGB: alpha composited on white, palette/CMYK/16-bit/grey converted."""
    if getattr(img, "is_animated", False):
        img.seek(0)
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.uint32 if mode == "I" else np.uint16)
        scale = 65535 if mode != "I" or arr.max() > 255 else 255
        grey = (arr.astype(np.float64) * (255.0 / scale)).round().clip(0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if mode == "F":
        arr = np.asarray(img, dtype=np.float32)
        return Image.fromarray(arr.clip(0, 255).astype(np.uint8), "L").convert("RGB")
    if mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
        mode = img.mode
    if mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode != "RGB":
        return img.convert("RGB")
    return img


def _resize_exact(rgb: np.ndarray, height: int, width: int) -> np.ndarray:
    """The same call the torchvision-backed HF processor makes, on uint8 CHW."""
    if rgb.shape[0] == height and rgb.shape[1] == width:
        return rgb
    import torch
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as tvF

    with warnings.catch_warnings():
        # PIL's buffer is read-only; torchvision only reads it.
        warnings.simplefilter("ignore", UserWarning)
        chw = torch.from_numpy(rgb).permute(2, 0, 1)
    out = tvF.resize(chw, [height, width], interpolation=InterpolationMode.BICUBIC,
                     antialias=True)
    return np.ascontiguousarray(out.permute(1, 2, 0).numpy())


def prepare_image(
    data: bytes,
    geometry: ProcessorGeometry,
    *,
    min_pixels: int,
    max_pixels: int,
    fidelity: Fidelity = "exact",
    max_decoded_pixels: int = 100_000_000,
) -> PreparedPixels:
    """Decode, orient, convert to RGB and resize to the model's target size."""
    img = open_image(data, max_decoded_pixels)
    try:
        # EXIF orientation swaps width/height; the target follows the oriented image.
        orientation = img.getexif().get(0x0112, 1) if hasattr(img, "getexif") else 1
        w, h = img.size
        if orientation in (5, 6, 7, 8):
            w, h = h, w
        if min(w, h) < 2:
            raise ImageError(f"The image is {w}x{h}; images must be at least 2 pixels a side.")
        th, tw = smart_resize(h, w, geometry.factor, min_pixels, max_pixels)
        if fidelity == "fast" and img.format == "JPEG" and img.mode in ("RGB", "L", "CMYK"):
            # Decode at 1/2, 1/4 or 1/8 scale when that still covers the target size.
            dw, dh = (th, tw) if orientation in (5, 6, 7, 8) else (tw, th)
            img.draft("RGB", (dw, dh))
        img.load()
        img = ImageOps.exif_transpose(img) if orientation != 1 else img
        rgb = np.asarray(to_rgb(img), dtype=np.uint8)
    except (ImageError, MemoryError):
        raise
    except Exception as exc:
        raise ImageError("The image could not be decoded: the file is corrupt or truncated.") \
            from exc
    return PreparedPixels(_resize_exact(rgb, th, tw), source_width=w, source_height=h)
