"""Every supported format and mode decodes to the RGB a viewer shows, and to exactly
what vLLM's own loader would hand the processor for the same bytes."""

from __future__ import annotations

import importlib.util
import io
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from PIL import Image, features

from handlers.imaging import decode_rgb
from tests.images import encode, exif_orientation, png16, png_chunk, png_raw

RED, GREEN, BLUE, WHITE, BLACK = (220, 30, 40), (30, 200, 60), (40, 50, 210), (255,) * 3, (0,) * 3


def _vllm_image_module() -> ModuleType:
    """vllm/multimodal/image.py loaded on its own: importing the `vllm` package takes ~20 s,
    this file needs only Pillow."""
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("vllm is not installed")
    root = Path(next(iter(spec.submodule_search_locations)))
    media = (root / "multimodal" / "media" / "image.py").read_text()
    # The mirror below is ImageMediaIO.load_bytes; fail loudly if vLLM changes it.
    for line in ("image = normalize_image(image)", "converted = self._convert_image_mode(image)"):
        assert line in media, f"vLLM's ImageMediaIO.load_bytes changed: {line!r} missing"
    path = root / "multimodal" / "image.py"
    mod_spec = importlib.util.spec_from_file_location("_vllm_mm_image", path)
    assert mod_spec and mod_spec.loader
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def vllm_load() -> Callable[[bytes], np.ndarray]:
    mod = _vllm_image_module()

    def load(data: bytes) -> np.ndarray:
        # ImageMediaIO(image_mode="RGB").load_bytes, white background.
        image = mod.normalize_image(mod.open_image(io.BytesIO(data)))
        image.load()
        if image.mode != "RGB":
            image = (mod.rgba_to_rgb(image) if image.mode == "RGBA"
                     else mod.convert_image_mode(image, "RGB"))
        return np.asarray(image)

    return load


def halves(mode: str, left: object, right: object, size: tuple[int, int] = (32, 16)) -> Image.Image:
    """Left half one colour, right half another."""
    img = Image.new(mode, size, left)
    img.paste(right, (size[0] // 2, 0, size[0], size[1]))
    return img


def palette(transparent: bool) -> bytes:
    img = halves("RGB", RED, BLUE).quantize(4)
    idx = np.asarray(img)[0, -1]  # the right half's palette index
    return encode(img, "PNG", **({"transparency": int(idx)} if transparent else {}))


def gif_animated() -> bytes:
    frames = [Image.new("RGB", (16, 16), c) for c in (RED, BLUE)]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)


def grey_trns() -> bytes:
    return encode(halves("L", 100, 7), "PNG", transparency=7)


def rgb_trns() -> bytes:
    return encode(halves("RGB", RED, BLUE), "PNG", transparency=BLUE)


def grey16_trns() -> bytes:
    """16-bit grey, right half 0, with a tRNS chunk making grey 0 transparent."""
    arr = np.zeros((16, 32), np.uint16)
    arr[:, :16] = 0x8000
    rows = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(16))
    return png_raw(32, 16, 16, 0, rows, extra=png_chunk(b"tRNS", b"\x00\x00"))


def rgb16() -> bytes:
    arr = np.zeros((16, 32, 3), np.uint16)
    arr[:, :16] = (65535, 32896, 2570)
    arr[:, 16:] = (0, 257 * 200, 65535)
    return png16(arr)


def grey16() -> bytes:
    arr = np.zeros((16, 32), np.uint16)
    arr[:, :16] = 0x8000
    arr[:, 16:] = 0xFFFF
    return png16(arr)


# name -> (bytes, expected left colour, expected right colour, tolerance)
CASES: dict[str, tuple[Callable[[], bytes], tuple[int, ...], tuple[int, ...], int]] = {
    "jpeg": (lambda: encode(halves("RGB", RED, BLUE), "JPEG", quality=95), RED, BLUE, 8),
    "jpeg-progressive": (lambda: encode(halves("RGB", RED, BLUE), "JPEG", quality=95,
                                        progressive=True), RED, BLUE, 8),
    "jpeg-grey": (lambda: encode(halves("L", 30, 200), "JPEG", quality=95), (30,) * 3,
                  (200,) * 3, 4),
    "jpeg-cmyk": (lambda: encode(halves("CMYK", (0, 255, 255, 0), (255, 255, 0, 0)), "JPEG",
                                 quality=95), (255, 0, 0), (0, 0, 255), 8),
    "png-rgb": (lambda: encode(halves("RGB", RED, BLUE)), RED, BLUE, 0),
    "png-rgba": (lambda: encode(halves("RGBA", (0, 0, 255, 128), (10, 20, 30, 0))),
                 (127, 127, 255), WHITE, 1),
    "png-rgba-opaque": (lambda: encode(halves("RGBA", (*RED, 255), (*GREEN, 255))), RED, GREEN, 0),
    "png-palette": (lambda: palette(False), RED, BLUE, 0),
    "png-palette-trns": (lambda: palette(True), RED, WHITE, 0),
    "png-grey": (lambda: encode(halves("L", 0, 180)), BLACK, (180,) * 3, 0),
    "png-grey-alpha": (lambda: encode(halves("LA", (0, 255), (0, 0))), BLACK, WHITE, 0),
    "png-grey-trns": (grey_trns, (100,) * 3, WHITE, 0),
    "png-1bit": (lambda: encode(halves("1", 0, 1)), BLACK, WHITE, 0),
    "png-rgb16": (rgb16, (255, 128, 10), (0, 200, 255), 0),
    "png-grey16": (grey16, (128,) * 3, WHITE, 0),
    # vLLM keeps an RGB image's tRNS colour as is; so do we.
    "png-rgb-trns": (rgb_trns, RED, BLUE, 0),
    "webp-lossless": (lambda: encode(halves("RGB", RED, BLUE), "WEBP", lossless=True), RED,
                      BLUE, 0),
    "webp-lossy": (lambda: encode(halves("RGB", RED, BLUE), "WEBP", quality=95), RED, BLUE, 12),
    "webp-alpha": (lambda: encode(halves("RGBA", (*RED, 255), (0, 0, 0, 0)), "WEBP",
                                  lossless=True), RED, WHITE, 0),
    "gif-first-frame": (gif_animated, RED, RED, 0),
    "gif-transparent": (lambda: encode(halves("P", 1, 2), "GIF", transparency=2), BLACK, WHITE, 0),
    "bmp": (lambda: encode(halves("RGB", RED, BLUE), "BMP"), RED, BLUE, 0),
    "bmp-1bit": (lambda: encode(halves("1", 1, 0), "BMP"), WHITE, BLACK, 0),
    "tiff": (lambda: encode(halves("RGB", RED, BLUE), "TIFF"), RED, BLUE, 0),
    "tiff-cmyk": (lambda: encode(halves("CMYK", (0, 0, 0, 0), (0, 0, 0, 255)), "TIFF"), WHITE,
                  BLACK, 0),
    "tiff-rgba": (lambda: encode(halves("RGBA", (*BLUE, 255), (0, 0, 0, 0)), "TIFF"), BLUE,
                  WHITE, 0),
    "tiff-grey16": (lambda: encode(Image.fromarray(np.asarray(halves("L", 128, 255)).astype(
        np.uint16) * 257), "TIFF"), (128,) * 3, WHITE, 0),
}
if features.check("avif"):
    CASES["avif"] = (lambda: encode(halves("RGB", RED, BLUE, (64, 32)), "AVIF", quality=95),
                     RED, BLUE, 14)

# Pillow's convert() clips 16-bit grey to 255 (a white image); we scale it instead.
DIVERGES_FROM_VLLM = {"png-grey16", "tiff-grey16"}


def centre(arr: np.ndarray, left: bool) -> np.ndarray:
    h, w = arr.shape[:2]
    x = w // 4 if left else 3 * w // 4
    return arr[h // 2, x].astype(int)


@pytest.mark.parametrize("name", list(CASES))
def test_decodes_to_the_colours_a_viewer_shows(name: str) -> None:
    make, left, right, tol = CASES[name]
    rgb = decode_rgb(make())
    assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3
    assert np.abs(centre(rgb, True) - left).max() <= tol, centre(rgb, True)
    assert np.abs(centre(rgb, False) - right).max() <= tol, centre(rgb, False)


@pytest.mark.parametrize("name", [n for n in CASES if n not in DIVERGES_FROM_VLLM])
def test_same_pixels_as_vllms_loader(name: str, vllm_load: Callable[[bytes], np.ndarray]) -> None:
    data = CASES[name][0]()
    assert np.array_equal(decode_rgb(data), vllm_load(data))


def test_sixteen_bit_grey_is_scaled_where_vllm_clips(
    vllm_load: Callable[[bytes], np.ndarray],
) -> None:
    data = grey16()
    assert centre(vllm_load(data), True).tolist() == [255] * 3  # why we diverge
    assert centre(decode_rgb(data), True).tolist() == [128] * 3


def test_sixteen_bit_grey_transparency_key_becomes_white() -> None:
    rgb = decode_rgb(grey16_trns())
    assert centre(rgb, True).tolist() == [128] * 3
    assert centre(rgb, False).tolist() == [255] * 3


def test_sixteen_bit_pngs_open_as_expected_modes() -> None:
    """Pillow 12/13: 16-bit grey opens as I;16 (our scaling applies), 16-bit RGB as 8-bit RGB."""
    assert Image.open(io.BytesIO(grey16())).mode == "I;16"
    assert Image.open(io.BytesIO(rgb16())).mode == "RGB"


# Undo each orientation's display transform, so the stored pixels show `canonical` upright.
_UNDO = {
    1: None,
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


def quadrants(w: int = 48, h: int = 32) -> Image.Image:
    img = Image.new("RGB", (w, h), WHITE)
    img.paste(RED, (0, 0, w // 2, h // 2))
    img.paste(GREEN, (w // 2, 0, w, h // 2))
    img.paste(BLUE, (0, h // 2, w // 2, h))
    return img


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied(
    orientation: int, fmt: str, vllm_load: Callable[[bytes], np.ndarray]
) -> None:
    upright = quadrants()
    undo = _UNDO[orientation]
    stored = upright if undo is None else upright.transpose(undo)
    kw: dict[str, object] = {"quality": 95} if fmt == "JPEG" else {}
    if fmt == "WEBP":
        kw = {"lossless": True}
    data = encode(stored, fmt, exif=exif_orientation(orientation), **kw)
    rgb = decode_rgb(data)
    assert rgb.shape == (32, 48, 3)
    for (y, x), colour in {(8, 12): RED, (8, 36): GREEN, (24, 12): BLUE, (24, 36): WHITE}.items():
        assert np.abs(rgb[y, x].astype(int) - colour).max() <= (8 if fmt == "JPEG" else 0)
    assert np.array_equal(rgb, vllm_load(data))


@pytest.mark.filterwarnings("ignore:Corrupt EXIF")
def test_corrupt_exif_is_ignored_like_vllm(vllm_load: Callable[[bytes], np.ndarray]) -> None:
    data = encode(quadrants(), "JPEG", exif=b"Exif\x00\x00II*\x00\xff\xff\xff\x7f garbage")
    rgb = decode_rgb(data)
    assert rgb.shape == (32, 48, 3)
    assert np.array_equal(rgb, vllm_load(data))
