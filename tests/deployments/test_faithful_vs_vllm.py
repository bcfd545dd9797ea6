"""Our preprocessing is faithful: same top logprobs as vLLM's own server, same model."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import openai
import pytest
from PIL import Image

from handlers.cpu_affinity import OMP_BIND_ENV, engine_core_split, omp_bind, worker_threads
from tests.images import data_uri, encode, exif_orientation, pattern
from tests.reference import VllmReferenceServer
from tests.servers import free_port
from tests.support import (
    API_KEY,
    ENGINE_ENV,
    MODEL,
    MODEL_DIR,
    greedy,
    image_msg,
    top_logprobs,
)


def worker_placement(engine: Any) -> dict[str, str]:
    """The reference's worker threads where Iris's are (engine.cpu_cores and
    cpu_worker_threads): kernels split their sums by thread count, so float32 logprobs only
    match to the last bit between engines running as many threads."""
    split = engine_core_split(engine)
    if split is None:
        return {}
    return {OMP_BIND_ENV: omp_bind(worker_threads(engine, split[0]))}


@pytest.fixture(scope="module")
def reference(iris_apps: Any) -> Iterator[openai.OpenAI]:
    # One for both layouts, started after Iris is up so the engines don't fight for the 2
    # cores at load.
    env = {**ENGINE_ENV, **worker_placement(iris_apps["local"].config.engine)}
    server = VllmReferenceServer(MODEL_DIR, MODEL, free_port(), env)
    try:
        server.wait_ready()
        yield openai.OpenAI(base_url=server.url, api_key=API_KEY, max_retries=0, timeout=300)
    finally:
        server.close()


def _rgba() -> Any:
    img = pattern(300, 200, seed=8).convert("RGBA")
    img.putalpha(Image.linear_gradient("L").resize((300, 200)))
    return img


def _palette_transparent() -> Any:
    img = pattern(240, 180, seed=9).convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    img.info["transparency"] = 3
    return img


# Every format and mode the preprocessor handles that vLLM's loader handles the same way
# (16-bit greyscale is the deliberate exception: we scale it, vLLM's convert clips it).
CASES: dict[str, tuple[Any, str, str, dict[str, Any]]] = {
    "png-small": (pattern(320, 240, seed=5), "PNG", "image/png", {}),
    "jpeg-large": (pattern(1600, 1200, seed=6), "JPEG", "image/jpeg", {}),
    "png-odd": (pattern(333, 517, seed=7), "PNG", "image/png", {}),
    "png-rgba": (_rgba(), "PNG", "image/png", {}),
    "png-palette-transparent": (_palette_transparent(), "PNG", "image/png", {}),
    "gif": (pattern(200, 150, seed=10).convert("P"), "GIF", "image/gif", {}),
    "webp": (pattern(256, 256, seed=11), "WEBP", "image/webp", {"quality": 90}),
    "bmp": (pattern(150, 100, seed=12), "BMP", "image/bmp", {}),
    "jpeg-grey": (pattern(400, 300, seed=13).convert("L"), "JPEG", "image/jpeg", {}),
    "jpeg-cmyk": (pattern(400, 300, seed=14).convert("CMYK"), "JPEG", "image/jpeg", {}),
    "jpeg-exif-rotated": (pattern(640, 360, seed=15), "JPEG", "image/jpeg",
                          {"exif": exif_orientation(6)}),
    "tiff": (pattern(200, 160, seed=16), "TIFF", "image/tiff", {}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_top_logprobs_equal_vllm_server(case: str, reference: openai.OpenAI, iris: str) -> None:
    img, fmt, mime, save_kw = CASES[case]
    url = data_uri(encode(img, fmt, **save_kw), mime)
    ours = greedy(openai.OpenAI(base_url=iris, api_key=API_KEY, max_retries=0, timeout=300),
                  image_msg(url))
    theirs = greedy(reference, image_msg(url))
    assert ours.usage and theirs.usage
    assert ours.usage.prompt_tokens == theirs.usage.prompt_tokens
    assert top_logprobs(ours) == top_logprobs(theirs)
