"""The target model's resize rule: which size (and crop) its image processor gives an image.

`rule_from(processor_cfg)` reads the image processor's settings (preprocessor_config.json, or
the `image_processor` section of processor_config.json; see imaging.read_processor_config) and
returns one of:

- `SmartResize`: Qwen2-VL's `smart_resize` (sides divisible by patch * merge, pixel count
  within bounds that the OpenAI `detail` level narrows, see `pixel_bounds`). Chosen when
  `image_processor_type` is Qwen2VLImageProcessor (Qwen2-VL, Qwen2.5-VL, Qwen3-VL checkpoints
  all say so), or when the config has any of merge_size / min_pixels / max_pixels /
  temporal_patch_size, or when it names no type and has no `crop_size` or height/width
  `size` (an empty config: Qwen2-VL's defaults, as before).
- `ShortestEdgeCrop`: CLIP's rule (transformers' CLIPImageProcessor, TorchvisionBackend):
  the short side becomes `shortest_edge`, the long side `int(shortest_edge * long / short)`,
  then a centre crop. Chosen for CLIPImageProcessor (and a typeless config with `crop_size`).
- `FixedSize`: an exact resize to height x width (SigLIP's SiglipImageProcessor; a typeless
  config whose `size` has height/width). CLIP with `use_square_size` is one too
  (224 x 224, whatever its `size`, as CLIPImageProcessor does).
- `CropOnly`: `do_resize: false`; only the crop.

For CLIP and SigLIP the settings are read as transformers does: a key that is absent or null
takes the processor class's default, an int `size` means shortest_edge (both classes set
`default_to_square = False`), an int `crop_size` a square. A centre crop larger than the
resized image pads it with black first (TorchvisionBackend.center_crop). `detail` does not
change their size. Any other processor type, or a size form these rules do not cover
(longest_edge, max_height/max_width), raises ValueError: better to refuse at start-up than to
hand the model pixels its own processor would not have made.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from handlers.errors import ImageError
from handlers.protocol import Detail

MAX_ASPECT_RATIO = 200  # Qwen2-VL's smart_resize refuses anything beyond this.
LOW_DETAIL_MAX_PIXELS = 200704  # ImagingSettings.low_detail_max_pixels' default.

# PIL resample codes (transformers' PILImageResampling) -> torchvision InterpolationMode
# values, as transformers' pil_torch_interpolation_mapping. BOX (4) and HAMMING (5) have no
# tensor kernel, so no rule takes them.
INTERPOLATIONS = {0: "nearest-exact", 1: "lanczos", 2: "bilinear", 3: "bicubic"}
BICUBIC = 3

_SMART_RESIZE_TYPES = ("Qwen2VLImageProcessor",)
_SMART_RESIZE_KEYS = ("merge_size", "min_pixels", "max_pixels", "temporal_patch_size")
# Class attributes of the processors we follow (transformers 5, models/*/image_processing_*.py).
_PROCESSOR_DEFAULTS: dict[str, dict[str, Any]] = {
    "CLIPImageProcessor": {
        "size": {"shortest_edge": 224}, "crop_size": {"height": 224, "width": 224},
        "do_resize": True, "do_center_crop": True, "resample": BICUBIC,
        "default_to_square": False,
    },
    "SiglipImageProcessor": {
        "size": {"height": 224, "width": 224}, "crop_size": None, "do_resize": True,
        "do_center_crop": None, "resample": BICUBIC, "default_to_square": False,
    },
}


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


def geometry_from(cfg: Mapping[str, Any]) -> ProcessorGeometry:
    """Patch/merge size and pixel bounds from the image processor's settings."""
    size = cfg.get("size") or {}
    return ProcessorGeometry(
        patch_size=int(cfg.get("patch_size", 14)),
        merge_size=int(cfg.get("merge_size", 2)),
        min_pixels=int(cfg.get("min_pixels") or size.get("shortest_edge") or 56 * 56),
        max_pixels=int(cfg.get("max_pixels") or size.get("longest_edge") or 28 * 28 * 1280),
    )


def check_aspect(width: int, height: int) -> None:
    if max(width, height) / min(width, height) > MAX_ASPECT_RATIO:
        raise ImageError(
            f"Image aspect ratio {width}x{height} is more extreme than the model accepts "
            f"(at most {MAX_ASPECT_RATIO}:1)."
        )


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


def pixel_bounds(
    geometry: ProcessorGeometry, detail: Detail, default_detail: str, low_max_pixels: int
) -> tuple[int, int]:
    """(min_pixels, max_pixels) for an OpenAI `detail` level.

    `low` caps the image at `low_max_pixels` (ImagingSettings.low_detail_max_pixels),
    `high` and `original` (full resolution) use the model's own max_pixels, `auto` means
    `default_detail`. An image already under the cap is not touched by `low`. Tokens per
    image = pixels / factor**2:

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


@dataclass(frozen=True)
class CropBox:
    """A window of the resized image, in its pixels. It may reach past the image's edges
    (negative top/left, or past the far side): those pixels are 0, as the processor pads
    with black before cropping."""

    top: int
    left: int
    height: int
    width: int


@dataclass(frozen=True)
class ResizePlan:
    """Resize to height x width (the processor's own torchvision call), then crop (if any)."""

    height: int
    width: int
    crop: CropBox | None = None
    interpolation: str = "bicubic"  # a torchvision InterpolationMode value

    @property
    def out_height(self) -> int:
        return self.height if self.crop is None else self.crop.height

    @property
    def out_width(self) -> int:
        return self.width if self.crop is None else self.crop.width

    @property
    def label(self) -> str:
        """For the item's uuid: with the image's content hash, it names the exact pixels
        (a rule maps the same bytes to the same pixels for a given cache_key)."""
        return f"{self.out_width}x{self.out_height}"


def centre_crop_box(height: int, width: int, crop_height: int, crop_width: int) -> CropBox | None:
    """TorchvisionBackend.center_crop as a box: a side shorter than the crop is padded with
    (crop - side) // 2 before and the rest after; a longer one starts at int((side - crop) / 2).
    None when the crop is the whole image."""
    if (crop_height, crop_width) == (height, width):
        return None

    def start(side: int, crop: int) -> int:
        return int((side - crop) / 2.0) if crop <= side else -((crop - side) // 2)

    return CropBox(start(height, crop_height), start(width, crop_width), crop_height, crop_width)


def apply_crop(rgb: np.ndarray, box: CropBox | None) -> np.ndarray:
    """HxWxC -> the box's pixels (0 outside the image), C-contiguous."""
    if box is None:
        return rgb
    h, w = rgb.shape[:2]
    bottom, right = box.top + box.height, box.left + box.width
    if box.top >= 0 and box.left >= 0 and bottom <= h and right <= w:
        return np.ascontiguousarray(rgb[box.top:bottom, box.left:right])
    out = np.zeros((box.height, box.width, *rgb.shape[2:]), dtype=rgb.dtype)
    y0, x0, y1, x1 = max(0, box.top), max(0, box.left), min(h, bottom), min(w, right)
    if y1 > y0 and x1 > x0:
        out[y0 - box.top:y1 - box.top, x0 - box.left:x1 - box.left] = rgb[y0:y1, x0:x1]
    return out


class ResizeRule(ABC):
    """The model's resize rule. Rules are frozen dataclasses: hashable and picklable."""

    @abstractmethod
    def plan(self, width: int, height: int, detail: Detail = "auto") -> ResizePlan:
        """Resize target and crop for a width x height source (after EXIF orientation)."""

    @abstractmethod
    def cache_key(self, detail: Detail = "auto") -> tuple[int, ...]:
        """What, besides the image's bytes, decides the pixels for this `detail`."""


@dataclass(frozen=True)
class SmartResize(ResizeRule):
    """Qwen2-VL: smart_resize within `pixel_bounds` for the detail level; bicubic, no crop."""

    geometry: ProcessorGeometry = field(default_factory=ProcessorGeometry)
    default_detail: str = "high"
    low_max_pixels: int = LOW_DETAIL_MAX_PIXELS

    def bounds(self, detail: Detail = "auto") -> tuple[int, int]:
        return pixel_bounds(self.geometry, detail, self.default_detail, self.low_max_pixels)

    def cache_key(self, detail: Detail = "auto") -> tuple[int, ...]:
        return self.bounds(detail)

    def plan(self, width: int, height: int, detail: Detail = "auto") -> ResizePlan:
        lo, hi = self.bounds(detail)
        th, tw = smart_resize(height, width, self.geometry.factor, lo, hi)
        return ResizePlan(th, tw)


@dataclass(frozen=True, kw_only=True)
class CropOnly(ResizeRule):
    """A processor's resize (none here: do_resize false) then its centre crop (if any)."""

    crop: tuple[int, int] | None = None  # (height, width); None: no crop
    resample: int = BICUBIC  # PIL code, as in the config

    def __post_init__(self) -> None:
        if self.resample not in INTERPOLATIONS:
            raise ValueError(f"resample {self.resample} has no torchvision tensor kernel")
        if self.crop is not None and min(self.crop) <= 0:
            raise ValueError(f"crop size must be positive, got {self.crop}")

    def resized(self, width: int, height: int) -> tuple[int, int]:
        """(height, width) after the resize step."""
        return height, width

    def cache_key(self, detail: Detail = "auto") -> tuple[int, ...]:
        return ()

    def plan(self, width: int, height: int, detail: Detail = "auto") -> ResizePlan:
        rh, rw = self.resized(width, height)
        box = None if self.crop is None else centre_crop_box(rh, rw, *self.crop)
        return ResizePlan(rh, rw, box, INTERPOLATIONS[self.resample])


@dataclass(frozen=True, kw_only=True)
class ShortestEdgeCrop(CropOnly):
    """CLIP: short side to `shortest_edge`, long side int(shortest_edge * long / short)
    (transformers' get_resize_output_image_size), then the centre crop."""

    shortest_edge: int

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.shortest_edge <= 0:
            raise ValueError(f"shortest_edge must be positive, got {self.shortest_edge}")

    def resized(self, width: int, height: int) -> tuple[int, int]:
        short, long = (width, height) if width <= height else (height, width)
        new_long = int(self.shortest_edge * long / short)
        if width <= height:
            return new_long, self.shortest_edge
        return self.shortest_edge, new_long


@dataclass(frozen=True, kw_only=True)
class FixedSize(CropOnly):
    """SigLIP: an exact resize to height x width (aspect not kept); usually no crop."""

    height: int
    width: int

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.height <= 0 or self.width <= 0:
            raise ValueError(f"size must be positive, got {self.height}x{self.width}")

    def resized(self, width: int, height: int) -> tuple[int, int]:
        return self.height, self.width


def rule_from(
    processor_cfg: Mapping[str, Any],
    *,
    default_detail: str = "high",
    low_max_pixels: int = LOW_DETAIL_MAX_PIXELS,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
) -> ResizeRule:
    """The resize rule of the processor these settings configure (see the module doc).

    The keyword arguments are ImagingSettings' and only shape SmartResize: `default_detail`
    and `low_max_pixels` as in `pixel_bounds`, `min_pixels`/`max_pixels` override the
    model's bounds. CLIP/SigLIP sizes do not depend on them.
    """
    cfg = dict(processor_cfg.get("image_processor", processor_cfg))
    kind = str(cfg.get("image_processor_type") or "").removesuffix("Fast").removesuffix("Pil")
    size = cfg.get("size")
    sized = isinstance(size, Mapping) and {"height", "width"} <= set(size)
    if kind in _SMART_RESIZE_TYPES or any(k in cfg for k in _SMART_RESIZE_KEYS) or (
        not kind and cfg.get("crop_size") is None and not sized
    ):
        geometry = geometry_from(cfg)
        geometry = ProcessorGeometry(
            geometry.patch_size, geometry.merge_size,
            min_pixels or geometry.min_pixels, max_pixels or geometry.max_pixels,
        )
        return SmartResize(geometry, default_detail, low_max_pixels)
    if not kind:
        kind = "SiglipImageProcessor" if sized else "CLIPImageProcessor"
    if kind not in _PROCESSOR_DEFAULTS:
        raise ValueError(
            f"image processor {kind!r} is not supported: Iris knows Qwen2-VL's smart_resize, "
            f"and {', '.join(_PROCESSOR_DEFAULTS)}"
        )
    return _processor_rule(kind, cfg)


def _processor_rule(kind: str, cfg: Mapping[str, Any]) -> ResizeRule:
    def setting(key: str) -> Any:
        # transformers' _set_attributes: a missing or null setting takes the class default.
        value = cfg.get(key)
        return _PROCESSOR_DEFAULTS[kind][key] if value is None else value

    size = _size_dict(setting("size"), bool(setting("default_to_square")))
    if kind == "CLIPImageProcessor" and cfg.get("use_square_size"):
        # Kosmos-2's flag: CLIPImageProcessor.__init__ squares the *class* default (224),
        # whatever `size` the config gives.
        edge = _PROCESSOR_DEFAULTS[kind]["size"]["shortest_edge"]
        size = {"height": edge, "width": edge}
    crop = None
    if setting("do_center_crop"):
        crop_size = _size_dict(setting("crop_size"), True)
        if set(crop_size) != {"height", "width"}:
            raise ValueError(f"crop_size must have height and width, got {crop_size}")
        crop = (int(crop_size["height"]), int(crop_size["width"]))
    resample = int(setting("resample"))
    if not setting("do_resize"):
        return CropOnly(crop=crop, resample=resample)
    if set(size) == {"shortest_edge"}:
        return ShortestEdgeCrop(shortest_edge=int(size["shortest_edge"]), crop=crop,
                                resample=resample)
    if set(size) == {"height", "width"}:
        return FixedSize(height=int(size["height"]), width=int(size["width"]), crop=crop,
                         resample=resample)
    raise ValueError(f"{kind} size {size} is not supported (only shortest_edge or height/width)")


def _size_dict(size: Any, default_to_square: bool) -> dict[str, int]:
    """transformers' get_size_dict."""
    if isinstance(size, Mapping):
        return {str(k): int(v) for k, v in size.items() if v is not None}
    if isinstance(size, int):
        if default_to_square:
            return {"height": size, "width": size}
        return {"shortest_edge": size}
    if isinstance(size, list | tuple) and len(size) == 2:
        return {"height": int(size[0]), "width": int(size[1])}
    raise ValueError(f"cannot read image size {size!r}")
