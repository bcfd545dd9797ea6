"""Bytes -> the exact uint8 RGB pixels the model's image processor would patch.

Decoding mirrors vLLM's own loader (`vllm/multimodal/image.py` + `ImageMediaIO.load_bytes`):
Pillow open, EXIF orientation, then RGB with any alpha pasted onto white. Qwen2-VL's
processor (transformers 5, torchvision backend) then resizes a uint8 CHW tensor with
torchvision's bicubic + antialias to the `smart_resize` size. We do the same here, so
vLLM's processor finds the image already at its target size and only normalises and
patches it. The one deliberate difference: 16-bit greyscale (mode I;16) is scaled to
8 bits (Pillow's `convert` clips it, which turns most such images white).

Other models' rules (CLIP's shortest edge + centre crop, SigLIP's fixed size) live in
handlers/resize_rules.py; `prepare_image` takes any of them and applies the resize with the
same torchvision call, then the crop, exactly as those processors do.
"""

from __future__ import annotations

import io
import json
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
from handlers.resize_rules import MAX_ASPECT_RATIO as MAX_ASPECT_RATIO
from handlers.resize_rules import ProcessorGeometry as ProcessorGeometry
from handlers.resize_rules import ResizeRule, SmartResize, apply_crop
from handlers.resize_rules import check_aspect as check_aspect
from handlers.resize_rules import geometry_from as geometry_from
from handlers.resize_rules import pixel_bounds as pixel_bounds
from handlers.resize_rules import smart_resize as smart_resize

# We check the pixel count ourselves (from the header, before decoding) and give a 400.
Image.MAX_IMAGE_PIXELS = None

Fidelity = Literal["exact", "fast"]
T = TypeVar("T")

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


def load_geometry(source: str | Path) -> ProcessorGeometry:
    """geometry_from the checkpoint's own processor config (benchmarks, tests)."""
    return geometry_from(read_processor_config(source))


def check_size(width: int, height: int) -> None:
    """Refuse sizes the model cannot take, saying why (a 400, before any decoding)."""
    if min(width, height) < MIN_SIDE:
        raise ImageError(
            f"The image is {width}x{height} pixels; the model needs at least {MIN_SIDE} "
            "pixels on each side."
        )
    check_aspect(width, height)


def keep_pixel_blocks(workers: int) -> None:
    """For a process that decodes big images on `workers` threads (the preprocessor).

    Pillow keeps an image in blocks of at most 16 MiB by default. In one block, its rows are
    contiguous and `_decode` borrows their memory (Arrow's C data interface) instead of
    packing a copy: np.asarray spends ~28 ms packing a 12 MP image into 36 MB, a third of
    its JPEG decode. A block that big is a fresh mmap for each image, whose page faults
    cost as much again, unless Pillow keeps freed blocks for the next image: one per
    worker. Pillow allocates what an image needs, not the block size; the blocks it keeps
    (each as big as a recent image) it shrinks to the next image's size."""
    Image.core.set_block_size(1 << 30)
    Image.core.set_blocks_max(max(1, workers))


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
    """HxWx4 uint8: RGB and a padding channel, Pillow's own memory, not copied (HxWx3
    where Pillow cannot lend it). `rgb_of` drops the padding after the resize, where there
    are fewer pixels to copy."""
    # Feed the decoder everything in one call (Pillow reads 64 KiB at a time): the GIL is
    # released per call, and each re-acquire can wait a switch interval (5 ms) when
    # another thread is busy. PNG still goes IDAT chunk by chunk.
    if isinstance(img, ImageFile.ImageFile):
        img.decodermaxblock = max(img.decodermaxblock, size)
    img.load()
    if orientation != 1:
        img = img.transpose(_TRANSPOSE[orientation])  # what exif_transpose does
    rgb = to_rgb(img)
    w, h = rgb.size
    import pyarrow as pa

    try:
        # The borrowed memory stays valid after `rgb` is gone (Pillow counts the loan).
        flat = pa.array(rgb).flatten()
    except ValueError:  # rows in several blocks (see keep_pixel_blocks)
        flat = None
    if flat is None or len(flat) != h * w * 4:
        return np.asarray(rgb, dtype=np.uint8)
    lent: np.ndarray = flat.to_numpy(zero_copy_only=True)
    return lent.reshape(h, w, 4)


def rgb_of(pixels: np.ndarray) -> np.ndarray:
    """HxWx3 C-contiguous uint8 from `_decode`'s or a resize's HxWx3 or HxWx4."""
    if pixels.shape[2] == 4:
        import cv2

        # 30x numpy's strided copy. One thread: parallelism comes from preparing images
        # at once.
        if cv2.getNumThreads() != 1:
            cv2.setNumThreads(1)
        rgb: np.ndarray = cv2.cvtColor(pixels, cv2.COLOR_RGBA2RGB)
        return rgb
    return np.ascontiguousarray(pixels)


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
    return rgb_of(_guarded(_decode, img, exif_orientation(img), len(data)))


def _resize_exact(rgb: np.ndarray, height: int, width: int,
                  interpolation: str = "bicubic") -> np.ndarray:
    """The same call the torchvision-backed HF processor makes, on uint8 CHW. Channels are
    resized independently: a padding channel in `rgb` changes no RGB value, and 4 channels
    are what torch's uint8 kernel works on anyway (it copies 3 into 4)."""
    if rgb.shape[0] == height and rgb.shape[1] == width:
        return rgb_of(rgb)  # tvF.resize returns its input unchanged too.
    import torch
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as tvF

    with warnings.catch_warnings():
        # PIL's buffer is read-only; torchvision only reads it.
        warnings.simplefilter("ignore", UserWarning)
        chw = torch.from_numpy(rgb).permute(2, 0, 1)
    # torch releases the GIL inside the kernel.
    out = tvF.resize(chw, [height, width], interpolation=InterpolationMode(interpolation),
                     antialias=True)
    return rgb_of(out.permute(1, 2, 0).numpy())


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
    return rgb_of(out[0].permute(1, 2, 0).numpy())


def prepare_image(
    data: bytes,
    rule: ResizeRule | ProcessorGeometry,
    *,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    detail: Detail = "auto",
    fidelity: Fidelity = "exact",
    max_decoded_pixels: int = 100_000_000,
    fast_headroom: float = FAST_MIN_HEADROOM,
) -> PreparedPixels:
    """Decode, orient, convert to RGB, resize and crop as the model's processor would.

    `rule` is the model's resize rule (handlers.resize_rules.rule_from) and `detail` the
    request's. The older form, a ProcessorGeometry with `min_pixels` and `max_pixels` (which
    already encode the detail level), is Qwen2-VL's smart_resize within those bounds.
    Blocking; run it in a worker thread: Pillow's decoders and torch's resize release
    the GIL for the heavy loops.
    `fidelity="fast"` decodes big JPEGs at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling)
    when that still leaves `fast_headroom` x the resize target, then does the same bicubic
    antialias resize (handlers.config.FAST_MIN_HEADROOM: the quality this buys), then the
    crop. Rules resizing with another filter than bicubic always take the exact path.
    """
    if isinstance(rule, ProcessorGeometry):
        if min_pixels is None or max_pixels is None:
            raise TypeError("prepare_image(geometry) needs min_pixels and max_pixels")
        rule = SmartResize(ProcessorGeometry(rule.patch_size, rule.merge_size,
                                             min_pixels, max_pixels))
        detail = "high"  # high: exactly the bounds given
    elif min_pixels is not None or max_pixels is not None:
        raise TypeError("min_pixels/max_pixels go with a ProcessorGeometry, not a ResizeRule")
    img = open_image(data, max_decoded_pixels)
    # Both checks are symmetric in width/height, so they need no EXIF (which, for a PNG,
    # Pillow only reads by decoding the whole image).
    check_size(*img.size)
    orientation = _guarded(exif_orientation, img)  # a PNG's EXIF read decodes it
    w, h = img.size
    if orientation in _SWAPS_SIDES:
        w, h = h, w
    plan = rule.plan(w, h, detail)
    th, tw = plan.height, plan.width
    scale = 1
    if (fidelity == "fast" and plan.interpolation == "bicubic"
            and isinstance(img, JpegImagePlugin.JpegImageFile)):
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
        out = _resize_exact(rgb, th, tw, plan.interpolation)
    return PreparedPixels(apply_crop(out, plan.crop), source_width=w, source_height=h)


def warm_up(rule: ResizeRule | ProcessorGeometry,
            fidelity: Fidelity = "exact") -> PreparedPixels:
    """Prepare a small synthetic JPEG once, so that the first real image does not pay for
    importing torchvision and starting torch's kernels (~4 s on a 2-core machine)."""
    buf = io.BytesIO()
    gradient = np.linspace(0, 255, 72 * 40 * 3, dtype=np.uint8).reshape(40, 72, 3)
    Image.fromarray(gradient, "RGB").save(buf, "JPEG")
    # Not on the patch grid (nor CLIP's or SigLIP's sizes), so the resize runs.
    if isinstance(rule, ProcessorGeometry):
        return prepare_image(buf.getvalue(), rule, min_pixels=rule.min_pixels,
                             max_pixels=rule.max_pixels, fidelity=fidelity)
    return prepare_image(buf.getvalue(), rule, fidelity=fidelity)
