"""Our preprocessing is faithful: same top logprobs as vLLM's own server, same model."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import openai
import pytest

from tests.conftest import ENGINE_ENV, MODEL_DIR, free_port
from tests.deployments.test_chat_e2e import API_KEY, MODEL, greedy, image_msg, top_logprobs
from tests.images import data_uri, encode, pattern
from tests.reference import VllmReferenceServer


@pytest.fixture(scope="module")
def reference(iris: str) -> Iterator[openai.OpenAI]:
    # Started after Iris is up so the two engines don't fight for the 2 cores at load.
    server = VllmReferenceServer(MODEL_DIR, MODEL, free_port(), ENGINE_ENV)
    try:
        server.wait_ready()
        yield openai.OpenAI(base_url=server.url, api_key=API_KEY, max_retries=0, timeout=300)
    finally:
        server.close()


CASES: dict[str, Any] = {
    "png-small": (pattern(320, 240, seed=5), "PNG", "image/png"),
    "jpeg-large": (pattern(1600, 1200, seed=6), "JPEG", "image/jpeg"),
    "png-odd": (pattern(333, 517, seed=7), "PNG", "image/png"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_top_logprobs_equal_vllm_server(case: str, reference: openai.OpenAI, iris: str) -> None:
    img, fmt, mime = CASES[case]
    url = data_uri(encode(img, fmt), mime)
    ours = greedy(openai.OpenAI(base_url=iris, api_key=API_KEY, max_retries=0, timeout=300),
                  image_msg(url))
    theirs = greedy(reference, image_msg(url))
    assert ours.usage and theirs.usage
    assert ours.usage.prompt_tokens == theirs.usage.prompt_tokens
    assert top_logprobs(ours) == top_logprobs(theirs)
