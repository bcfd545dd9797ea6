"""What an image may be: pixel limits from the header, sizes the model takes, detail."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image

from handlers.errors import ImageError, ImageTooLarge
from handlers.imaging import (
    ProcessorGeometry,
    configure_threads,
    load_geometry,
    pixel_bounds,
    prepare_image,
    smart_resize,
)
from tests.images import encode, exif_orientation, pattern, png_bomb

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / ".models" / "demo-vlm"
QWEN2_VL = ProcessorGeometry(patch_size=14, merge_size=2, min_pixels=3136, max_pixels=1003520)
LOW_MAX_PIXELS = 200704  # ImagingSettings.low_detail_max_pixels default


def prep(data: bytes, **kw: object) -> tuple[int, int]:
    px = prepare_image(data, QWEN2_VL, min_pixels=QWEN2_VL.min_pixels,
                       max_pixels=QWEN2_VL.max_pixels, **kw)
    return px.height, px.width


def test_png_bomb_is_refused_from_the_header_without_allocating() -> None:
    """A 100 kB PNG that decodes to 30000x30000: refused before any pixel is allocated.
    Runs in a fresh interpreter so the peak RSS is this check's alone."""
    script = textwrap.dedent("""
        import resource, sys, tracemalloc
        from handlers.errors import ImageTooLarge
        from handlers.imaging import ProcessorGeometry, prepare_image
        from tests.images import png_bomb
        data = png_bomb(30000)
        g = ProcessorGeometry()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        tracemalloc.start()
        try:
            prepare_image(data, g, min_pixels=g.min_pixels, max_pixels=g.max_pixels)
        except ImageTooLarge as exc:
            print("refused:", exc, file=sys.stderr)
        else:
            sys.exit("not refused")
        peak = tracemalloc.get_traced_memory()[1]
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
        print(grown, peak)
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "30000x30000" in out.stderr
    rss_kib, traced = (int(v) for v in out.stdout.split())
    assert rss_kib < 50 * 1024 and traced < 50 * 2**20


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"])
def test_pixel_limit_applies_to_every_format(fmt: str) -> None:
    data = encode(pattern(40, 30), fmt)
    with pytest.raises(ImageTooLarge, match="40x30"):
        prep(data, max_decoded_pixels=1000)
    assert prep(data, max_decoded_pixels=1200) == (56, 84)


def test_bomb_error_is_a_4xx_with_a_code() -> None:
    with pytest.raises(ImageTooLarge) as info:
        prep(png_bomb(12000))
    assert info.value.status == 400 and info.value.code == "image_too_large"


@pytest.mark.parametrize("size", [(1, 1), (1, 50), (80, 1)])
def test_one_pixel_sides_are_refused_with_a_reason(size: tuple[int, int]) -> None:
    with pytest.raises(ImageError, match="at least 2 pixels on each side") as info:
        prep(encode(Image.new("RGB", size, (9, 9, 9))))
    assert info.value.status == 400


@pytest.mark.parametrize(("size", "target"), [((2, 2), (56, 56)), ((2, 400), (812, 28)),
                                              ((3, 5), (84, 56))])
def test_tiny_images_are_upscaled_to_min_pixels(size: tuple[int, int],
                                                target: tuple[int, int]) -> None:
    assert prep(encode(Image.new("RGB", size, (9, 200, 9)))) == target


@pytest.mark.parametrize("size", [(2, 401), (10, 2001), (6000, 20)])
def test_aspect_ratio_beyond_the_models_rule_is_refused(size: tuple[int, int]) -> None:
    with pytest.raises(ImageError, match=r"aspect ratio .*at most 200:1"):
        prep(encode(Image.new("L", size)))


def test_unsupported_format_is_refused() -> None:
    with pytest.raises(ImageError, match="not a supported image format"):
        prep(encode(pattern(32, 32), "PPM"))  # Pillow reads it; we do not accept it


def test_exif_rotation_decides_the_target_size() -> None:
    data = encode(pattern(400, 200), "JPEG", exif=exif_orientation(6))
    assert prep(data) == (392, 196)
    assert prep(data, fidelity="fast") == (392, 196)


# detail ---------------------------------------------------------------------------------


def tokens(geometry: ProcessorGeometry, h: int, w: int, detail: str,
           default: str = "high") -> int:
    lo, hi = pixel_bounds(geometry, detail, default, LOW_MAX_PIXELS)
    return geometry.tokens_for(*smart_resize(h, w, geometry.factor, lo, hi))


@pytest.mark.parametrize(("h", "w"), [(3000, 4000), (4000, 3000), (1080, 1920), (100, 19000),
                                      (8000, 8000), (713, 1289)])
def test_low_detail_is_at_most_256_tokens(h: int, w: int) -> None:
    assert tokens(QWEN2_VL, h, w, "low") <= 256
    assert tokens(QWEN2_VL, h, w, "high") > 256


@pytest.mark.parametrize(("h", "w"), [(200, 300), (448, 448), (28, 56), (300, 600)])
def test_low_detail_leaves_small_images_alone(h: int, w: int) -> None:
    lo = pixel_bounds(QWEN2_VL, "low", "high", LOW_MAX_PIXELS)
    hi = pixel_bounds(QWEN2_VL, "high", "high", LOW_MAX_PIXELS)
    assert smart_resize(h, w, 28, *lo) == smart_resize(h, w, 28, *hi)


def test_high_is_the_models_maximum_and_auto_the_default() -> None:
    assert pixel_bounds(QWEN2_VL, "high", "low", LOW_MAX_PIXELS) == (3136, 1003520)
    assert tokens(QWEN2_VL, 3000, 4000, "high") <= 1280
    assert pixel_bounds(QWEN2_VL, "auto", "low", LOW_MAX_PIXELS) == (3136, LOW_MAX_PIXELS)
    assert pixel_bounds(QWEN2_VL, "auto", "high", LOW_MAX_PIXELS) == (3136, 1003520)


def test_low_budget_never_exceeds_the_models_own_max() -> None:
    tiny = ProcessorGeometry(min_pixels=3136, max_pixels=100_000)
    assert pixel_bounds(tiny, "low", "high", LOW_MAX_PIXELS) == (3136, 100_000)


@pytest.mark.skipif(not (DEMO / "processor_config.json").exists(), reason="demo model missing")
def test_demo_model_geometry() -> None:
    assert load_geometry(DEMO) == QWEN2_VL


def test_configure_threads_reaches_worker_threads() -> None:
    import torch

    before = torch.get_num_threads()
    try:
        with ThreadPoolExecutor(2, initializer=configure_threads, initargs=(1,)) as pool:
            assert set(pool.map(lambda _: torch.get_num_threads(), range(4))) == {1}
    finally:
        torch.set_num_threads(before)
