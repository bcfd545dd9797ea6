from __future__ import annotations

import gc
import io
from collections.abc import Iterator

import numpy as np
import pytest
from PIL import Image

from handlers.errors import ImageError, ImageTooLarge
from handlers.imaging import (
    ProcessorGeometry,
    _decode,
    keep_pixel_blocks,
    open_image,
    prepare_image,
    smart_resize,
)
from tests.images import encode, natural, pattern

GEO = ProcessorGeometry(patch_size=14, merge_size=2, min_pixels=3136, max_pixels=1003520)


def prep(data: bytes, **kw: object) -> np.ndarray:
    return prepare_image(
        data, GEO, min_pixels=GEO.min_pixels, max_pixels=GEO.max_pixels, **kw
    ).array


@pytest.mark.parametrize(
    ("h", "w"), [(480, 640), (3000, 4000), (28, 28), (10, 1000), (1080, 1920), (2, 300)]
)
def test_smart_resize_matches_transformers(h: int, w: int) -> None:
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize as ref

    assert smart_resize(h, w, 28, GEO.min_pixels, GEO.max_pixels) == ref(
        h, w, factor=28, min_pixels=GEO.min_pixels, max_pixels=GEO.max_pixels
    )


def test_exact_mode_matches_hf_processor_pixels() -> None:
    """Our uint8 output, normalised by the HF processor, equals its own full pipeline."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

    hf = Qwen2VLImageProcessor(min_pixels=GEO.min_pixels, max_pixels=GEO.max_pixels)
    img = pattern(333, 517, seed=3)
    ours = prep(encode(img))
    want = hf(images=[img], return_tensors="pt")
    got = hf(images=[Image.fromarray(ours)], return_tensors="pt")
    assert want["image_grid_thw"].tolist() == got["image_grid_thw"].tolist()
    assert np.array_equal(want["pixel_values"].numpy(), got["pixel_values"].numpy())


def test_target_size_is_multiple_of_patch_grid() -> None:
    out = prep(encode(pattern(640, 480)))
    assert out.shape == (476, 644, 3) and out.dtype == np.uint8


def test_alpha_is_composited_on_white() -> None:
    img = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    out = prep(encode(img, "PNG"))
    assert out.min() == 255


def test_exif_orientation_applied() -> None:
    img = pattern(120, 60)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    out = prep(encode(img, "JPEG", exif=exif.tobytes()))
    assert out.shape[0] > out.shape[1]  # portrait once oriented


def test_decompression_bomb_is_refused_from_header() -> None:
    buf = io.BytesIO()
    Image.new("L", (6000, 6000)).save(buf, "PNG")
    with pytest.raises(ImageTooLarge):
        prepare_image(buf.getvalue(), GEO, min_pixels=GEO.min_pixels,
                      max_pixels=GEO.max_pixels, max_decoded_pixels=10_000_000)


@pytest.mark.parametrize("data", [b"not an image", encode(pattern(64, 64), "PNG")[:200]])
def test_garbage_and_truncated_images_are_image_errors(data: bytes) -> None:
    with pytest.raises(ImageError):
        prep(data)


def test_extreme_aspect_ratio_is_refused() -> None:
    with pytest.raises(ImageError, match="aspect ratio"):
        prep(encode(Image.new("RGB", (4000, 10))))


def test_warm_up_runs_the_resize_path() -> None:
    import subprocess
    import sys
    from pathlib import Path

    # A fresh interpreter: whether torchvision is loaded must be down to warm_up alone.
    code = (
        "import sys\n"
        "from handlers.imaging import ProcessorGeometry, warm_up\n"
        "assert 'torchvision' not in sys.modules\n"
        "out = warm_up(ProcessorGeometry())\n"
        "assert 'torchvision' in sys.modules\n"
        "h, w, c = out.array.shape\n"
        "assert (h % 28, w % 28, c) == (0, 0, 3) and (w, h) != (72, 40)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True,
                   cwd=Path(__file__).resolve().parents[2])


@pytest.fixture
def preprocessor_blocks() -> Iterator[None]:
    """Pillow's allocator as the preprocessor sets it (keep_pixel_blocks), then as it was."""
    size, kept = Image.core.get_block_size(), Image.core.get_blocks_max()
    keep_pixel_blocks(2)
    try:
        yield
    finally:
        Image.core.set_blocks_max(kept)
        Image.core.set_block_size(size)


@pytest.mark.parametrize("exif", [1, 6])
def test_a_12mp_photo_lent_by_pillow_prepares_as_one_copied_out(
    preprocessor_blocks: None, exif: int,
) -> None:
    """The preprocessor borrows a big image's memory from Pillow instead of copying it out;
    the pixels it prepares are the same, EXIF rotation included."""
    meta = Image.Exif()
    meta[0x0112] = exif
    data = encode(natural(4000, 3000, seed=5), "JPEG", quality=90, exif=meta.tobytes())
    lent = _decode(open_image(data, 10**8), exif, len(data))
    assert lent.shape[2] == 4 and not lent.flags.owndata  # Pillow's memory, not a copy
    got = prep(data)
    Image.core.set_block_size(16 << 20)  # Pillow's default: a 12 MP image in 3 blocks
    copied = _decode(open_image(data, 10**8), exif, len(data))
    assert copied.shape[2] == 3
    assert np.array_equal(got, prep(data))
    assert np.array_equal(lent[..., :3], copied)


def test_lent_pixels_outlive_their_image_while_pillow_reuses_blocks(
    preprocessor_blocks: None,
) -> None:
    """Pillow counts the loan: the block is neither freed nor handed to the next image
    while the array that borrowed it lives."""
    data = [encode(natural(2000, 1500, seed=s), "JPEG") for s in range(4)]
    lent = _decode(open_image(data[0], 10**8), 1, len(data[0]))
    want = lent.copy()
    for _ in range(2):  # the next images take (and give back) every block Pillow keeps
        others = [_decode(open_image(d, 10**8), 1, len(d)) for d in data[1:]]
        del others
        gc.collect()
    assert np.array_equal(lent, want)
