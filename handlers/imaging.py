"""Bytes -> the exact uint8 RGB pixels the model's image processor would patch.

Decoding mirrors vLLM's own loader (`vllm/multimodal/image.py` + `ImageMediaIO.load_bytes`):
Pillow open, EXIF orientation, then RGB with any alpha pasted onto white. Qwen2-VL's
processor (transformers 5, torchvision backend) then resizes a uint8 CHW tensor with
torchvision's bicubic + antialias to the `smart_resize` size. We do the same here, so
vLLM's processor finds the image already at its target size and only normalises and
patches it. The one deliberate difference: 16-bit greyscale (mode I;16) is scaled to
8 bits (Pillow's `convert` clips it, which turns most such images white).
"""

from __future__ import annotations

import io
import json
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
from PIL import Image, ImageFile, JpegImagePlugin

from handlers.config import FAST_MIN_HEADROOM
from handlers.errors import ImageError, ImageTooLarge
from handlers.formats import NAMES, PILLOW_FORMATS
from handlers.protocol import Detail

# We check the pixel count ourselves (from the header, before decoding) and give a 400.
Image.MAX_IMAGE_PIXELS = None

Fidelity = Literal["exact", "fast"]
T = TypeVar("T")

MAX_ASPECT_RATIO = 200  # Qwen2-VL's smart_resize refuses anything beyond this.
MIN_SIDE = 2  # A 1-pixel side carries no picture, and HF's processor may read it as channels.

# Raster formats decoded in-process by Pillow (handlers/formats.py). A subset of vLLM's
# allowlist: the formats clients actually send (MPO, phones' multi-picture JPEG, opens
# through the JPEG plugin).
ALLOWED_FORMATS = PILLOW_FORMATS

WHITE = (255, 255, 255)
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N")
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SWAPS_SIDES = (5, 6, 7, 8)

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


def read_processor_config(source: str | Path) -> dict[str, Any]:
    """The image processor's settings from a checkpoint (a local directory, or a Hugging Face
    id through the local HF cache or the hub): preprocessor_config.json (most checkpoints) or
    the `image_processor` section of processor_config.json (what transformers 5 writes)."""
    local = Path(source)
    for name in ("preprocessor_config.json", "processor_config.json"):
        path = local / name
        if not local.is_dir():
            from huggingface_hub import hf_hub_download

            try:
                path = Path(hf_hub_download(str(source), name))
            except Exception:
                continue
        if path.exists():
            cfg = json.loads(path.read_text())
            return dict(cfg.get("image_processor", cfg))
    raise FileNotFoundError(f"no image processor config found for model {source}")


def geometry_from(cfg: dict[str, Any]) -> ProcessorGeometry:
    """Patch/merge size and pixel bounds from the image processor's settings."""
    size = cfg.get("size") or {}
    return ProcessorGeometry(
        patch_size=int(cfg.get("patch_size", 14)),
        merge_size=int(cfg.get("merge_size", 2)),
        min_pixels=int(cfg.get("min_pixels") or size.get("shortest_edge") or 56 * 56),
        max_pixels=int(cfg.get("max_pixels") or size.get("longest_edge") or 28 * 28 * 1280),
    )


def load_geometry(source: str | Path) -> ProcessorGeometry:
    """geometry_from the checkpoint's own processor config (benchmarks, tests)."""
    return geometry_from(read_processor_config(source))


def smart_resize(
    height: int, width: int, factor: int, min_pixels: int, max_pixels: int
) -> tuple[int, int]:
    """Qwen2-VL's rule: sides divisible by `factor`, pixels within bounds, aspect kept."""
    check_aspect(width, height)
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



def check_size(width: int, height: int) -> None:
    """Refuse sizes the model cannot take, saying why (a 400, before any decoding)."""
    if min(width, height) < MIN_SIDE:
        raise ImageError(
            f"The image is {width}x{height} pixels; the model needs at least {MIN_SIDE} "
            "pixels on each side."
        )
    check_aspect(width, height)


def check_aspect(width: int, height: int) -> None:
    if max(width, height) / min(width, height) > MAX_ASPECT_RATIO:
        raise ImageError(
            f"Image aspect ratio {width}x{height} is more extreme than the model accepts "
            f"(at most {MAX_ASPECT_RATIO}:1)."
        )


def pixel_bounds(
    geometry: ProcessorGeometry, detail: Detail, default_detail: str, low_max_pixels: int
) -> tuple[int, int]:
    """(min_pixels, max_pixels) for an OpenAI `detail` level.

    `low` caps the image at `low_max_pixels` (ImagingSettings.low_detail_max_pixels),
    `high` uses the model's own max_pixels, `auto` means `default_detail`. An image already
    under the cap is not touched by `low`. Tokens per image = pixels / factor**2:

    - Qwen2-VL / Qwen2.5-VL (patch 14, merge 2, factor 28, 784 px per token): low (200704 px)
      is at most 256 tokens; high is max_pixels / 784, i.e. 1280 tokens for the demo model
      (max_pixels 1003520) and 16384 for the stock checkpoints (12845056).
    - Qwen3-VL (patch 16, merge 2, factor 32, 1024 px per token): low is at most 196 tokens.
    """
    level = default_detail if detail == "auto" else detail
    if level == "low":
        cap = min(low_max_pixels, geometry.max_pixels)
        return geometry.min_pixels, max(geometry.min_pixels, cap)
    return geometry.min_pixels, geometry.max_pixels


def configure_threads(n: int = 1) -> None:
    """Intra-op threads for torch's resize. One per worker thread is best on small replicas:
    parallelism comes from resizing several images at once, and the resize is a small part
    of the work (decoding dominates and is single-threaded). torch keeps the count per OS
    thread, so call this in each worker (e.g. as the ThreadPoolExecutor initializer)."""
    import torch

    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


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
    """Open lazily (header only) and check the pixel count before any decoding."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except Exception as exc:
        raise ImageError(
            f"The image could not be decoded: not a supported image format ({NAMES})."
        ) from exc
    w, h = img.size
    if w <= 0 or h <= 0:
        raise ImageError("The image has no pixels.")
    if w * h > max_decoded_pixels:
        raise ImageTooLarge(
            f"The image is {w}x{h} ({w * h} pixels); the limit is {max_decoded_pixels} pixels."
        )
    return img


def exif_orientation(img: Image.Image) -> int:
    """EXIF orientation 1-8 (1 when absent or unreadable, as vLLM ignores a bad EXIF)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Corrupt EXIF data"
            value = img.getexif().get(0x0112, 1)
    except Exception:
        return 1
    return value if isinstance(value, int) and value in _TRANSPOSE else 1


def _has_transparency(img: Image.Image) -> bool:
    # vLLM's rule: an alpha band, or a tRNS / GIF transparency key.
    return img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info


def _sixteen_bit_to_l(img: Image.Image) -> Image.Image:
    """I;16 -> L keeping the high byte (as Pillow does for 16-bit RGB PNGs), and its
    transparency key (if any) as an LA alpha band."""
    arr = np.asarray(img).astype(np.uint16, copy=False)
    grey = Image.fromarray((arr >> 8).astype(np.uint8), "L")
    key = img.info.get("transparency")
    if not isinstance(key, int):
        return grey
    alpha = Image.fromarray(np.where(arr == key, 0, 255).astype(np.uint8), "L")
    return Image.merge("LA", (grey, alpha))


def to_rgb(img: Image.Image) -> Image.Image:
    """Any mode -> RGB the way vLLM does it: transparency pasted onto white,
    palette/CMYK/grey/1-bit converted by Pillow; 16-bit grey scaled (see module doc)."""
    if img.mode in _SIXTEEN_BIT:
        img = _sixteen_bit_to_l(img)
    if img.mode == "RGB":
        return img  # vLLM returns RGB as is, even with a tRNS colour key.
    if _has_transparency(img):
        rgba = img if img.mode == "RGBA" else img.convert("RGBA")
        out = Image.new("RGB", img.size, WHITE)
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    return img.convert("RGB")


def draft_scale(
    width: int, height: int, target_w: int, target_h: int, headroom: float = FAST_MIN_HEADROOM
) -> int:
    """The JPEG DCT scale (1, 2, 4 or 8) for the fast path: the largest whose output is
    still `headroom` times the target in both dimensions (1 = do not draft)."""
    for scale in (8, 4, 2):
        if width / scale >= headroom * target_w and height / scale >= headroom * target_h:
            return scale
    return 1


def _decode(img: Image.Image, orientation: int, size: int) -> np.ndarray:
    # Feed the decoder everything in one call (Pillow reads 64 KiB at a time): the GIL is
    # released per call, and each re-acquire can wait a switch interval (5 ms) when
    # another thread is busy. PNG still goes IDAT chunk by chunk.
    if isinstance(img, ImageFile.ImageFile):
        img.decodermaxblock = max(img.decodermaxblock, size)
    img.load()
    if orientation != 1:
        img = img.transpose(_TRANSPOSE[orientation])  # what exif_transpose does
    return np.asarray(to_rgb(img), dtype=np.uint8)


def _guarded(fn: Callable[..., T], *args: Any) -> T:
    """Run a decoding step; anything Pillow raises is the file's fault (a 400)."""
    try:
        return fn(*args)
    except (ImageError, MemoryError):
        raise
    except Exception as exc:
        raise ImageError(
            "The image could not be decoded: the file is corrupt or truncated."
        ) from exc


def decode_rgb(data: bytes, max_decoded_pixels: int = 100_000_000) -> np.ndarray:
    """HxWx3 uint8 at full size: what vLLM's loader gives the processor for these bytes."""
    img = open_image(data, max_decoded_pixels)
    check_size(*img.size)
    return _guarded(_decode, img, exif_orientation(img), len(data))


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
    # torch releases the GIL inside the kernel.
    out = tvF.resize(chw, [height, width], interpolation=InterpolationMode.BICUBIC,
                     antialias=True)
    return np.ascontiguousarray(out.permute(1, 2, 0).numpy())


def _resize_drafted(rgb: np.ndarray, height: int, width: int, scale: int,
                    src_height: int, src_width: int) -> np.ndarray:
    """Resize a 1/`scale` decode as if it were the full image. The draft has
    ceil(side / scale) pixels, so it spans up to scale-1 source pixels more than the
    image; resizing it to the target would stretch the picture by that much (a sub-pixel
    shift that costs ~10 dB on fine detail). Passing the true scale factors keeps every
    output pixel centred where the exact resize puts it."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        nchw = torch.from_numpy(rgb).permute(2, 0, 1).unsqueeze(0)
    # The op behind interpolate(antialias=True); unlike it, takes both size and scales.
    out = torch.ops.aten._upsample_bicubic2d_aa.default(
        nchw, [height, width], False, scale * height / src_height, scale * width / src_width
    )
    return np.ascontiguousarray(out[0].permute(1, 2, 0).numpy())


def prepare_image(
    data: bytes,
    geometry: ProcessorGeometry,
    *,
    min_pixels: int,
    max_pixels: int,
    fidelity: Fidelity = "exact",
    max_decoded_pixels: int = 100_000_000,
    fast_headroom: float = FAST_MIN_HEADROOM,
) -> PreparedPixels:
    """Decode, orient, convert to RGB and resize to the model's target size.

    Blocking; run it in a worker thread: Pillow's decoders and torch's resize release
    the GIL for the heavy loops.
    `fidelity="fast"` decodes big JPEGs at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling)
    when that still leaves `fast_headroom` x the target size, then does the same bicubic
    antialias resize (handlers.config.FAST_MIN_HEADROOM: the quality this buys).
    """
    img = open_image(data, max_decoded_pixels)
    # Both checks are symmetric in width/height, so they need no EXIF (which, for a PNG,
    # Pillow only reads by decoding the whole image).
    check_size(*img.size)
    orientation = _guarded(exif_orientation, img)  # a PNG's EXIF read decodes it
    w, h = img.size
    if orientation in _SWAPS_SIDES:
        w, h = h, w
    th, tw = smart_resize(h, w, geometry.factor, min_pixels, max_pixels)
    scale = 1
    if fidelity == "fast" and isinstance(img, JpegImagePlugin.JpegImageFile):
        # Drafting happens in the file's stored orientation (EXIF rotation comes later).
        sw, sh = img.size
        scale = draft_scale(sw, sh, th if orientation in _SWAPS_SIDES else tw,
                            tw if orientation in _SWAPS_SIDES else th, fast_headroom)
        if scale > 1:
            # Pillow picks the largest scale whose output covers the size asked for.
            img.draft(img.mode, (sw // scale, sh // scale))
            if img.size != (-(-sw // scale), -(-sh // scale)):
                scale = 1  # Not drafted (e.g. a multi-tile JPEG); plain exact path.
    rgb = _guarded(_decode, img, orientation, len(data))
    if scale > 1:
        out = _resize_drafted(rgb, th, tw, scale, h, w)
    else:
        out = _resize_exact(rgb, th, tw)
    return PreparedPixels(out, source_width=w, source_height=h)


def warm_up(geometry: ProcessorGeometry, fidelity: Fidelity = "exact") -> PreparedPixels:
    """Prepare a small synthetic JPEG once, so that the first real image does not pay for
    importing torchvision and starting torch's kernels (~4 s on a 2-core machine)."""
    buf = io.BytesIO()
    gradient = np.linspace(0, 255, 72 * 40 * 3, dtype=np.uint8).reshape(40, 72, 3)
    Image.fromarray(gradient, "RGB").save(buf, "JPEG")
    # Not on the patch grid, so the resize runs.
    return prepare_image(buf.getvalue(), geometry, min_pixels=geometry.min_pixels,
                         max_pixels=geometry.max_pixels, fidelity=fidelity)
