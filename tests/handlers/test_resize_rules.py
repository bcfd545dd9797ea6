"""Resize rules: Iris's uint8 pixels equal what transformers' own image processors make of the
same RGB image right before normalisation (CLIP: shortest edge + centre crop; SigLIP: fixed
size), and the Qwen2-VL rule through the new API gives the same pixels as before."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from handlers.imaging import (
    ProcessorGeometry,
    decode_rgb,
    pixel_bounds,
    prepare_image,
    read_processor_config,
    smart_resize,
    warm_up,
)
from handlers.protocol import Detail
from handlers.resize_rules import (
    CropBox,
    CropOnly,
    FixedSize,
    ResizeRule,
    ShortestEdgeCrop,
    SmartResize,
    apply_crop,
    centre_crop_box,
    rule_from,
)
from tests.images import encode, exif_orientation, natural, pattern, psnr
from tests.support import CLIP_DIR, MODEL_DIR, ROOT

DEMO_CLIP = CLIP_DIR
DEMO_VLM = MODEL_DIR
LOW = 200704


@pytest.fixture(scope="module")
def demo_clip() -> Path:
    if not (DEMO_CLIP / "processor_config.json").exists():
        subprocess.run([sys.executable, "scripts/make_demo_clip.py"], cwd=ROOT, check=True)
    return DEMO_CLIP


@pytest.fixture(scope="module")
def clip_hf(demo_clip: Path) -> Any:
    from transformers import AutoImageProcessor

    return AutoImageProcessor.from_pretrained(str(demo_clip), local_files_only=True)


def hf_uint8(proc: Any, rgb: np.ndarray) -> np.ndarray:
    """The processor's pixels right before normalisation, HxWx3 uint8."""
    out = proc(images=Image.fromarray(rgb, "RGB"), do_rescale=False, do_normalize=False,
               return_tensors="pt")["pixel_values"][0]
    assert str(out.dtype) == "torch.uint8"
    return np.ascontiguousarray(out.permute(1, 2, 0).numpy())


def same_as_hf(proc: Any, rule: ResizeRule, data: bytes) -> np.ndarray:
    ours = prepare_image(data, rule).array
    want = hf_uint8(proc, decode_rgb(data))  # both from the same RGB image
    assert ours.dtype == np.uint8 and ours.flags.c_contiguous
    assert ours.shape == want.shape
    diff = np.abs(ours.astype(np.int16) - want.astype(np.int16))
    assert int(diff.max()) == 0
    return ours


def rgba(w: int, h: int) -> Image.Image:
    img = natural(w, h, seed=5).convert("RGBA")
    alpha = np.linspace(0, 255, w * h).reshape(h, w).astype(np.uint8)
    img.putalpha(Image.fromarray(alpha, "L"))
    return img


def palette(w: int, h: int, transparent: bool) -> bytes:
    img = pattern(w, h, seed=2).convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    return encode(img, "PNG", **({"transparency": 3} if transparent else {}))


# (name, bytes): portrait, landscape, square, smaller than the crop, large; every colour mode.
IMAGES: list[tuple[str, bytes]] = [
    ("jpeg-landscape-517x333", encode(natural(517, 333, seed=1), "JPEG", quality=90)),
    ("jpeg-portrait-301x467", encode(natural(301, 467, seed=2), "JPEG", quality=85)),
    ("jpeg-exif-rotated-401x203", encode(natural(401, 203, seed=3), "JPEG",
                                          exif=exif_orientation(6))),
    ("jpeg-large-3001x2001", encode(natural(3001, 2001, seed=4), "JPEG", quality=90)),
    ("jpeg-grey-211x157", encode(natural(211, 157, seed=6).convert("L"), "JPEG")),
    ("jpeg-cmyk-150x99", encode(natural(150, 99, seed=7).convert("CMYK"), "JPEG")),
    ("png-square-199x199", encode(pattern(199, 199, seed=8), "PNG")),
    ("png-exact-64x64", encode(pattern(64, 64, seed=9), "PNG")),
    ("png-small-23x41", encode(pattern(23, 41, seed=10), "PNG")),
    ("png-small-50x64", encode(pattern(50, 64, seed=11), "PNG")),
    ("png-tiny-3x2", encode(pattern(3, 2, seed=12), "PNG")),
    ("png-wide-1200x7", encode(pattern(1200, 7, seed=13), "PNG")),
    ("png-rgba-97x61", encode(rgba(97, 61), "PNG")),
    ("png-la-33x120", encode(rgba(33, 120).convert("LA"), "PNG")),
    ("png-palette-77x131", palette(77, 131, transparent=False)),
    ("png-palette-trns-131x77", palette(131, 77, transparent=True)),
    ("png-grey-65x129", encode(pattern(65, 129, seed=14).convert("L"), "PNG")),
    ("png-1bit-90x45", encode(pattern(90, 45, seed=15).convert("1"), "PNG")),
    ("gif-67x45", encode(pattern(67, 45, seed=16).convert("P"), "GIF")),
    ("webp-123x89", encode(natural(123, 89, seed=17), "WEBP", quality=80)),
]
IDS = [name for name, _ in IMAGES]
DATA = [data for _, data in IMAGES]


def test_rule_from_demo_clip(demo_clip: Path) -> None:
    rule = rule_from(read_processor_config(demo_clip))
    assert rule == ShortestEdgeCrop(shortest_edge=64, crop=(64, 64), resample=3)
    assert rule.cache_key("low") == rule.cache_key("high") == ()
    for detail in ("auto", "low", "high", "original"):
        plan = rule.plan(640, 480, detail)
        assert (plan.height, plan.width) == (64, 85)
        assert plan.crop == CropBox(0, 10, 64, 64) and plan.label == "64x64"
    # The long side is truncated, as transformers' get_resize_output_image_size does.
    assert rule.plan(100, 301).height == int(64 * 301 / 100) == 192
    assert rule.plan(64, 64).crop is None


@pytest.mark.parametrize("data", DATA, ids=IDS)
def test_demo_clip_pixels_equal_transformers(clip_hf: Any, demo_clip: Path, data: bytes) -> None:
    rule = rule_from(read_processor_config(demo_clip))
    ours = same_as_hf(clip_hf, rule, data)
    assert ours.shape == (64, 64, 3)


def test_demo_clip_processor_then_only_normalises(clip_hf: Any, demo_clip: Path) -> None:
    """What vLLM then does: the processor leaves our pixels as they are, and its full output
    (normalised) equals its output on the original image."""
    rule = rule_from(read_processor_config(demo_clip))
    for data in DATA[:4]:
        ours = prepare_image(data, rule).array
        assert np.array_equal(hf_uint8(clip_hf, ours), ours)
        full = clip_hf(images=Image.fromarray(decode_rgb(data)), return_tensors="pt")
        again = clip_hf(images=Image.fromarray(ours), return_tensors="pt")
        assert np.array_equal(full["pixel_values"].numpy(), again["pixel_values"].numpy())


CLIP_VARIANTS: list[dict[str, Any]] = [
    # Crop larger than the resized image on both sides: black padding, odd split.
    {"size": {"shortest_edge": 48}, "crop_size": {"height": 64, "width": 81}},
    # Non-square crop, padded on one side only for some images.
    {"size": {"shortest_edge": 40}, "crop_size": {"height": 33, "width": 57}},
    # do_resize off: small images padded, big ones cropped.
    {"do_resize": False, "crop_size": {"height": 64, "width": 64}},
    # No crop: only the shortest edge.
    {"size": {"shortest_edge": 37}, "do_center_crop": False},
    # Legacy int forms (size: shortest edge, crop_size: square) and a bilinear filter.
    {"size": 56, "crop_size": 48, "resample": 2},
    # Lanczos (torchvision >= 0.27 on CPU) and nearest (torchvision's nearest-exact).
    {"size": {"shortest_edge": 45}, "crop_size": 40, "resample": 1},
    {"size": {"shortest_edge": 45}, "crop_size": 40, "resample": 0},
    # Kosmos-2's use_square_size: a 224 x 224 resize (the class default), then the crop.
    {"size": {"shortest_edge": 50}, "crop_size": 45, "use_square_size": True},
]


@pytest.mark.parametrize("variant", CLIP_VARIANTS, ids=lambda v: str(sorted(v)))
def test_clip_config_variants_equal_transformers(variant: dict[str, Any]) -> None:
    from transformers import CLIPImageProcessor

    cfg = {"image_processor_type": "CLIPImageProcessor", **variant}
    rule = rule_from(cfg)
    proc = CLIPImageProcessor(**variant)
    for data in DATA[1:3] + DATA[7:13] + DATA[14:16]:
        same_as_hf(proc, rule, data)


SIGLIP_VARIANTS: list[dict[str, Any]] = [
    {"size": {"height": 48, "width": 40}, "resample": 3},
    {"size": {"height": 37, "width": 77}, "resample": 2},
    {},  # class defaults: 224 x 224 bicubic
]


@pytest.mark.parametrize("variant", SIGLIP_VARIANTS, ids=lambda v: str(v.get("size")))
def test_siglip_fixed_size_equals_transformers(variant: dict[str, Any]) -> None:
    siglip = pytest.importorskip("transformers.models.siglip.image_processing_siglip")
    cfg = {"image_processor_type": "SiglipImageProcessor", "do_normalize": True, **variant}
    rule = rule_from(cfg)
    assert isinstance(rule, FixedSize) and rule.crop is None
    size = variant.get("size", {"height": 224, "width": 224})
    assert rule.plan(640, 480, "low").label == f"{size['width']}x{size['height']}"
    proc = siglip.SiglipImageProcessor(**cfg)
    for data in DATA:
        ours = same_as_hf(proc, rule, data)
        if variant:
            assert np.array_equal(hf_uint8(proc, ours), ours)  # then only normalised


def test_rule_from_picks_by_type_and_keys() -> None:
    vlm = read_processor_config(DEMO_VLM)
    assert rule_from(vlm) == SmartResize(ProcessorGeometry(14, 2, 3136, 1003520))
    # Qwen3-VL's processor names itself with a Fast suffix; bounds can be overridden.
    fast = {**vlm, "image_processor_type": "Qwen2VLImageProcessorFast"}
    assert rule_from(fast, min_pixels=1000, max_pixels=9000, default_detail="low",
                     low_max_pixels=5000) == SmartResize(
        ProcessorGeometry(14, 2, 1000, 9000), "low", 5000)
    assert rule_from({}) == SmartResize()  # no settings: Qwen2-VL's defaults, as before
    assert rule_from({"crop_size": 32, "size": 40}) == ShortestEdgeCrop(
        shortest_edge=40, crop=(32, 32))
    assert rule_from({"size": {"height": 30, "width": 20}}) == FixedSize(height=30, width=20)
    # The whole processor_config.json works too; null settings take the class default.
    assert rule_from({"image_processor": {"image_processor_type": "CLIPImageProcessor",
                                          "do_center_crop": None}}) == ShortestEdgeCrop(
        shortest_edge=224, crop=(224, 224))
    assert rule_from({"image_processor_type": "CLIPImageProcessor", "do_resize": False,
                      "do_center_crop": False}) == CropOnly()
    with pytest.raises(ValueError, match="not supported"):
        rule_from({"image_processor_type": "LlavaNextImageProcessor"})
    with pytest.raises(ValueError, match="not supported"):
        rule_from({"image_processor_type": "CLIPImageProcessor",
                   "size": {"shortest_edge": 10, "longest_edge": 20}})
    with pytest.raises(ValueError, match="resample"):
        rule_from({"image_processor_type": "SiglipImageProcessor", "resample": 4})


def test_centre_crop_box_and_padding() -> None:
    assert centre_crop_box(85, 64, 64, 64) == CropBox(10, 0, 64, 64)  # int(21 / 2)
    assert centre_crop_box(20, 31, 25, 30) == CropBox(-2, 0, 25, 30)  # pad 2 above, 3 below
    assert centre_crop_box(64, 64, 64, 64) is None
    rgb = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3) + 1
    out = apply_crop(rgb, CropBox(-1, 1, 7, 3))
    want = np.zeros((7, 3, 3), np.uint8)
    want[1:5] = rgb[:, 1:4]
    assert np.array_equal(out, want)


@pytest.mark.parametrize("detail", ["low", "high", "auto"])
def test_qwen_rule_through_new_api_gives_the_same_pixels(detail: Detail) -> None:
    rule = rule_from(read_processor_config(DEMO_VLM))
    assert isinstance(rule, SmartResize)
    geo = rule.geometry
    lo, hi = pixel_bounds(geo, detail, "high", LOW)
    assert rule.cache_key(detail) == (lo, hi)
    for data in (DATA[0], DATA[3], DATA[12]):
        old = prepare_image(data, geo, min_pixels=lo, max_pixels=hi)
        new = prepare_image(data, rule, detail=detail)
        assert np.array_equal(old.array, new.array)
        h, w = decode_rgb(data).shape[:2]
        assert new.array.shape[:2] == smart_resize(h, w, geo.factor, lo, hi)
        fast_old = prepare_image(data, geo, min_pixels=lo, max_pixels=hi, fidelity="fast")
        fast_new = prepare_image(data, rule, detail=detail, fidelity="fast")
        assert np.array_equal(fast_old.array, fast_new.array)


def test_qwen_rule_pixels_still_match_transformers() -> None:
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

    rule = rule_from(read_processor_config(DEMO_VLM))
    assert isinstance(rule, SmartResize)
    geo = rule.geometry
    hf = Qwen2VLImageProcessor(min_pixels=geo.min_pixels, max_pixels=geo.max_pixels)
    for data in (DATA[1], DATA[12]):
        ours = prepare_image(data, rule, detail="high").array
        want = hf(images=[Image.fromarray(decode_rgb(data))], return_tensors="pt")
        got = hf(images=[Image.fromarray(ours)], return_tensors="pt")
        assert want["image_grid_thw"].tolist() == got["image_grid_thw"].tolist()
        assert np.array_equal(want["pixel_values"].numpy(), got["pixel_values"].numpy())


def test_fast_path_with_a_crop_rule_stays_close(demo_clip: Path) -> None:
    rule = ShortestEdgeCrop(shortest_edge=224, crop=(224, 224))
    data = DATA[3]  # 3001 x 2001 JPEG: drafted at 1/4
    exact = prepare_image(data, rule).array
    fast = prepare_image(data, rule, fidelity="fast").array
    assert exact.shape == fast.shape == (224, 224, 3)
    assert psnr(exact, fast) > 35
    bilinear = ShortestEdgeCrop(shortest_edge=224, crop=(224, 224), resample=2)
    assert np.array_equal(prepare_image(data, bilinear, fidelity="fast").array,
                          prepare_image(data, bilinear).array)  # only bicubic drafts


def test_bounds_only_with_a_geometry_and_warm_up_takes_a_rule() -> None:
    rule = ShortestEdgeCrop(shortest_edge=64, crop=(64, 64))
    with pytest.raises(TypeError):
        prepare_image(DATA[0], rule, min_pixels=1, max_pixels=2)
    with pytest.raises(TypeError):
        prepare_image(DATA[0], ProcessorGeometry())
    assert warm_up(rule).array.shape == (64, 64, 3)
    assert warm_up(FixedSize(height=30, width=50)).array.shape == (30, 50, 3)
