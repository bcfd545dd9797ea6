"""An app that serves only the encoder (`serve_chat: false`, what an image-search deployment
runs), deployed beside the session's apps on the same Ray instance and reached through
Serve's proxy: /ready waits for the encoder, /v1/models lists only it, chat is a 404 in the
envelope, and its embeddings are the local app's (the same encoder). Its encoder runs in the
EmbeddingServer deployment (the local app's, inside its ingress); it prepares data: images in
its ingress (deployments.data_uris_in_ingress), http(s) and s3 images in its preprocessor."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest

from tests.images import data_uri, encode, natural, png_bomb
from tests.servers import ImageServer
from tests.support import AUTH, ENCODER, IrisApp, assert_envelope, good_body, post_chat

APP = "iris-search"


@pytest.fixture(scope="module")
def search(iris_apps: dict[str, IrisApp]) -> Iterator[tuple[str, list[httpx.Response]]]:
    """(the app's base URL, every /ready answer from its ingress's start to the first 200)."""
    from ray import serve

    from deployments.app import build_app

    local = iris_apps["local"]
    d = local.config.deployments
    cfg = local.config.model_copy(update={
        "app_name": APP, "serve_chat": False,
        # Room beside the session's two apps on its 8 logical CPUs.
        "deployments": d.model_copy(update={
            "data_uris_in_ingress": True,
            # The encoder in a deployment of its own (the local app has it in its ingress).
            "encoder_in_ingress": False,
            "preprocessor": d.preprocessor.model_copy(update={"num_cpus": 0.25})})})
    base = f"{local.proxy_base.removesuffix('/v1')}/search"
    serve.run_many([serve.RunTarget(build_app(cfg), name=APP, route_prefix="/search")],
                   wait_for_applications_running=False)
    answers: list[httpx.Response] = []
    try:
        deadline = time.monotonic() + 900  # a guard, not an assertion
        while time.monotonic() < deadline:
            try:
                r = httpx.get(f"{base}/ready", headers=AUTH, timeout=30)
            except httpx.HTTPError:
                r = None
            # Before the ingress is up the proxy answers for it (404, no route yet): skip.
            if r is not None and r.headers.get("content-type", "").startswith(
                    "application/json"):
                answers.append(r)
                if r.status_code == 200:
                    break
            time.sleep(0.5)
        yield f"{base}/v1", answers
    finally:
        serve.delete(APP)


def test_ready_waits_for_the_encoder(search: tuple[str, list[httpx.Response]]) -> None:
    """The ingress is up long before the encoder's engine: until the engine is, /ready says
    503 not_ready (with Retry-After), so a load balancer sends it nothing yet."""
    _, answers = search
    assert answers and answers[-1].status_code == 200, [a.text for a in answers[-3:]]
    assert answers[-1].json() == {"status": "ready"}
    early = answers[:-1]
    assert early, "the app was ready at its first answer: the encoder was never waited for"
    for r in early:
        assert assert_envelope(r, 503)["code"] == "not_ready"
        assert r.headers.get("retry-after")


def test_models_lists_only_the_encoder(search: tuple[str, list[httpx.Response]]) -> None:
    base, _ = search
    r = httpx.get(f"{base}/models", headers=AUTH, timeout=30)
    assert r.status_code == 200
    assert [m["id"] for m in r.json()["data"]] == [ENCODER]


def test_chat_is_not_served(search: tuple[str, list[httpx.Response]]) -> None:
    base, _ = search
    err = assert_envelope(post_chat(base, good_body()), 404)
    assert err["param"] == "model"


def test_embeddings_are_the_local_apps(search: tuple[str, list[httpx.Response]],
                                       iris_apps: dict[str, IrisApp]) -> None:
    base, _ = search
    url = data_uri(encode(natural(200, 150, seed=71), "JPEG"), "image/jpeg")
    body: dict[str, Any] = {"model": ENCODER, "input": [
        "a photo of a cat", {"type": "image_url", "image_url": {"url": url}}]}
    mine = post_chat(base, body, path="/embeddings")
    theirs = post_chat(iris_apps["local"].base, body, path="/embeddings")
    assert mine.status_code == theirs.status_code == 200, mine.text
    for a, b in zip(mine.json()["data"], theirs.json()["data"], strict=True):
        va, vb = np.asarray(a["embedding"]), np.asarray(b["embedding"])
        assert float(va @ vb / np.linalg.norm(va) / np.linalg.norm(vb)) >= 0.9999


def search_prep_stats() -> dict[str, int]:
    from ray import serve
    stats: dict[str, int] = serve.get_deployment_handle(
        "ImagePreprocessor", APP).stats.remote().result()
    return stats


def test_data_uris_are_prepared_in_the_ingress(search: tuple[str, list[httpx.Response]],
                                               image_server: ImageServer) -> None:
    """A data: image skips the preprocessor; an http image still goes through the fetcher
    (one hit on the loopback server) and the preprocessor; both embed."""
    base, _ = search
    before = search_prep_stats()
    url = data_uri(encode(natural(320, 240, seed=72), "PNG"), "image/png")
    r = post_chat(base, {"model": ENCODER, "input": [
        {"type": "image_url", "image_url": {"url": url}}]}, path="/embeddings")
    assert r.status_code == 200, r.text
    assert search_prep_stats()["misses"] == before["misses"]
    http_url = image_server.add_bytes(
        "/search-prep.jpg", encode(natural(320, 240, seed=73), "JPEG"), "image/jpeg")
    r = post_chat(base, {"model": ENCODER, "input": [
        {"type": "image_url", "image_url": {"url": http_url}}]}, path="/embeddings")
    assert r.status_code == 200, r.text
    assert image_server.hits["/search-prep.jpg"] == 1
    assert search_prep_stats()["misses"] == before["misses"] + 1


def test_a_bad_data_uri_in_the_ingress_is_a_400(search: tuple[str, list[httpx.Response]]
                                                ) -> None:
    """The ingress applies the preprocessor's rules: not an image, or a decompression bomb,
    is the client's error, in the envelope, naming the item."""
    base, _ = search
    junk = "data:image/png;base64,aGVsbG8gd29ybGQ="
    for url, code in ((junk, None), (data_uri(png_bomb(40000)), "image_too_large")):
        r = post_chat(base, {"model": ENCODER, "input": [
            "a cat", {"type": "image_url", "image_url": {"url": url}}]}, path="/embeddings")
        err = assert_envelope(r, 400)
        assert err["param"].startswith("input[1]"), err
        if code is not None:
            assert err["code"] == code, err
