"""/v1/embeddings through the running app, with the demo CLIP encoder: the vectors are the
Hugging Face model's own (get_text_features / get_image_features, normalised) for text and
for images of every kind from data:, http and s3, and vLLM's own pooling server's; the openai
SDK (float and base64) and LangChain work unmodified; bad inputs are 400s."""

from __future__ import annotations

import io
import uuid
from collections.abc import Iterator
from typing import Any

import numpy as np
import openai
import pytest
from PIL import Image

from tests.images import data_uri, encode, natural, pattern
from tests.servers import ImageServer, S3Server, free_port
from tests.support import (
    API_KEY,
    CLIP_DIR,
    ENCODER,
    IrisApp,
    assert_envelope,
    assert_still_serving,
    engine_stats,
    post_chat,
)

TEXTS = ["a photo of a cat", "two dogs playing in the snow", "🙂", "x"]


def _rgba() -> Image.Image:
    img = pattern(120, 90, seed=61).convert("RGBA")
    img.putalpha(Image.linear_gradient("L").resize((120, 90)))
    return img


def _palette() -> Image.Image:
    img = pattern(77, 200, seed=62).convert("P", palette=Image.Palette.ADAPTIVE, colors=32)
    img.info["transparency"] = 2
    return img


IMAGES: dict[str, tuple[bytes, str]] = {
    "jpeg": (encode(natural(320, 240, seed=60), "JPEG"), "image/jpeg"),
    "png": (encode(pattern(200, 300, seed=63)), "image/png"),
    "rgba": (encode(_rgba()), "image/png"),
    "palette": (encode(_palette()), "image/png"),
}


@pytest.fixture(scope="module")
def app(iris_apps: dict[str, IrisApp]) -> IrisApp:
    return iris_apps["local"]  # the layout that serves the encoder


@pytest.fixture(scope="module")
def client(app: IrisApp) -> openai.OpenAI:
    return openai.OpenAI(base_url=app.base, api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def hf() -> Any:
    """The encoder as Hugging Face runs it: (model, processor)."""
    from transformers import AutoImageProcessor, CLIPModel, CLIPTokenizer

    model = CLIPModel.from_pretrained(CLIP_DIR, local_files_only=True).eval()
    return (model, AutoImageProcessor.from_pretrained(CLIP_DIR, local_files_only=True),
            CLIPTokenizer.from_pretrained(CLIP_DIR, local_files_only=True))


def normalised(v: Any) -> np.ndarray:
    a = np.asarray(v, dtype=np.float64).ravel()
    return a / np.linalg.norm(a)


def hf_text(hf: Any, text: str) -> np.ndarray:
    import torch

    model, _, tokenizer = hf
    with torch.no_grad():
        out = model.get_text_features(**tokenizer([text], return_tensors="pt"))
    return normalised(getattr(out, "pooler_output", out).numpy())


def hf_image(hf: Any, data: bytes) -> np.ndarray:
    """The image as vLLM's loader gives it to the processor (transparency on white)."""
    import torch

    model, processor, _ = hf
    img = Image.open(io.BytesIO(data))
    if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        rgb = Image.new("RGB", img.size, (255, 255, 255))
        rgb.paste(rgba, mask=rgba.getchannel("A"))
    else:
        rgb = img.convert("RGB")
    with torch.no_grad():
        out = model.get_image_features(**processor(images=rgb, return_tensors="pt"))
    return normalised(getattr(out, "pooler_output", out).numpy())


def cosine(a: Any, b: Any) -> float:
    return float(normalised(a) @ normalised(b))


def image_item(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


def test_text_embeddings_are_the_models_own(client: openai.OpenAI, hf: Any) -> None:
    resp = client.embeddings.create(model=ENCODER, input=TEXTS, encoding_format="float")
    assert [d.index for d in resp.data] == list(range(len(TEXTS)))
    for text, data in zip(TEXTS, resp.data, strict=True):
        assert cosine(data.embedding, hf_text(hf, text)) >= 0.9999, text
    assert resp.usage.prompt_tokens >= len(TEXTS) * 3  # special tokens included


@pytest.mark.parametrize("source", ["data", "http", "s3"])
def test_image_embeddings_are_the_models_own(app: IrisApp, hf: Any, source: str,
                                             image_server: ImageServer, s3: S3Server) -> None:
    urls = []
    for kind, (data, mime) in IMAGES.items():
        name = f"emb-{uuid.uuid4().hex}-{kind}"
        urls.append({"data": lambda d=data, m=mime: data_uri(d, m),
                     "http": lambda d=data, m=mime, n=name: image_server.add_bytes(f"/{n}", d, m),
                     "s3": lambda d=data, n=name: s3.put("iris-test-images", n, d)}[source]())
    resp = post_chat(app.base, {"model": ENCODER, "input": [image_item(u) for u in urls]},
                     path="/embeddings")
    assert resp.status_code == 200, resp.text
    got = resp.json()["data"]
    for (kind, (data, _)), item in zip(IMAGES.items(), got, strict=True):
        assert cosine(item["embedding"], hf_image(hf, data)) >= 0.9999, kind


def test_text_and_images_mixed_keep_their_order(client: openai.OpenAI, hf: Any) -> None:
    jpeg = IMAGES["jpeg"][0]
    items: list[Any] = [TEXTS[0], image_item(data_uri(jpeg, "image/jpeg")),
                        {"type": "text", "text": TEXTS[1]}]
    resp = client.embeddings.create(model=ENCODER, input=items,
                                    encoding_format="float")
    vectors = [d.embedding for d in resp.data]
    assert cosine(vectors[0], hf_text(hf, TEXTS[0])) >= 0.9999
    assert cosine(vectors[1], hf_image(hf, jpeg)) >= 0.9999
    assert cosine(vectors[2], hf_text(hf, TEXTS[1])) >= 0.9999


def test_the_sdks_default_base64_decodes_to_the_same_vectors(client: openai.OpenAI) -> None:
    floats = client.embeddings.create(model=ENCODER, input=TEXTS, encoding_format="float")
    default = client.embeddings.create(model=ENCODER, input=TEXTS)  # the SDK asks for base64
    for a, b in zip(floats.data, default.data, strict=True):
        assert np.allclose(a.embedding, b.embedding, atol=1e-6)


def test_langchain_openai_embeddings(app: IrisApp, hf: Any) -> None:
    from langchain_openai import OpenAIEmbeddings

    # check_embedding_ctx_length=False: send strings (by default LangChain sends tiktoken
    # token ids, which mean nothing to another model's tokenizer).
    lc = OpenAIEmbeddings(model=ENCODER, base_url=app.base, api_key=API_KEY,
                          check_embedding_ctx_length=False)
    assert cosine(lc.embed_query(TEXTS[1]), hf_text(hf, TEXTS[1])) >= 0.9999
    assert len(lc.embed_documents(TEXTS[:2])) == 2


@pytest.mark.parametrize(("body", "status", "param"), [
    ({"model": ENCODER, "input": []}, 400, "input"),
    ({"model": ENCODER, "input": ""}, 400, "input"),
    ({"model": ENCODER, "input": ["ok", {"type": "video_url", "video_url": {"url": "x"}}]},
     400, "input[1].type"),
    ({"model": ENCODER, "input": ["x"] * 300}, 400, "input"),
    ({"model": ENCODER, "input": [image_item("file:///etc/passwd")]}, 400,
     "input[0].image_url.url"),
    ({"model": ENCODER, "input": [image_item("data:image/png;base64,AAAA")]}, 400,
     "input[0].image_url.url"),
    ({"model": ENCODER, "input": "x", "dimensions": 8}, 400, "dimensions"),
    ({"model": "nope", "input": "x"}, 404, "model"),
])
def test_bad_inputs_are_client_errors(app: IrisApp, body: dict[str, Any], status: int,
                                      param: str) -> None:
    err = assert_envelope(post_chat(app.base, body, path="/embeddings"), status)
    assert (err["param"] or "").startswith(param), err


def test_the_chat_model_is_not_an_encoder(app: IrisApp) -> None:
    err = assert_envelope(post_chat(app.base, {"model": "demo-vlm", "input": "x"},
                                    path="/embeddings"), 404)
    assert err["param"] == "model"


def test_models_lists_both(client: openai.OpenAI) -> None:
    assert {m.id for m in client.models.list().data} == {"demo-vlm", ENCODER}


@pytest.fixture(scope="module")
def vllm_pooling(app: IrisApp) -> Iterator[str]:
    """vLLM's own OpenAI server on the same encoder (pooling runner)."""
    import subprocess
    import sys
    import time

    import httpx

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(CLIP_DIR),
         "--served-model-name", ENCODER, "--runner", "pooling", "--dtype", "float32",
         "--host", "127.0.0.1", "--port", str(port), "--kv-cache-memory-bytes", "67108864"],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            assert proc.poll() is None, "vLLM's server exited"
            try:
                if httpx.get(f"{url}/health", timeout=2).is_success:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        yield url
    finally:
        import os
        import signal

        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def test_the_same_vectors_as_vllms_own_server(app: IrisApp, vllm_pooling: str) -> None:
    import httpx

    ours = post_chat(app.base, {"model": ENCODER, "input": TEXTS}, path="/embeddings").json()
    theirs = httpx.post(f"{vllm_pooling}/v1/embeddings", json={"model": ENCODER,
                                                               "input": TEXTS}).json()
    for a, b in zip(ours["data"], theirs["data"], strict=True):
        assert cosine(a["embedding"], b["embedding"]) >= 0.9999
    for kind, (data, mime) in IMAGES.items():
        url = data_uri(data, mime)
        ours = post_chat(app.base, {"model": ENCODER, "input": [image_item(url)]},
                         path="/embeddings").json()["data"][0]["embedding"]
        theirs = httpx.post(f"{vllm_pooling}/v1/embeddings", json={
            "model": ENCODER, "messages": [{"role": "user", "content": [image_item(url)]}],
        }).json()["data"][0]["embedding"]
        assert cosine(ours, theirs) >= 0.9999, kind


def test_a_killed_encoder_engine_is_restarted_in_its_replica(app: IrisApp) -> None:
    """make serve runs the encoder's engine inside ChatIngress (encoder_in_ingress). When its
    EngineCore dies, the request it held is answered 503 engine_unavailable (never left
    waiting), as is every request until the replica has started it again; chat goes on
    meanwhile, and nothing of the dead engine is left."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    from handlers.reaper import alive, process_tree

    assert app.config.deployments.encoder_in_ingress
    before = engine_stats(app.config.app_name, "ChatIngress")[0]["encoder"]
    old = process_tree(before["engine_pids"])  # the EngineCore and its worker
    assert len(old) >= 2
    core = old[0]
    core.suspend()  # a request sent now stays in the engine
    with ThreadPoolExecutor(1) as pool:
        held = pool.submit(post_chat, app.base, {"model": ENCODER, "input": ["a dog"]},
                           path="/embeddings")
        deadline = time.monotonic() + 120  # a guard, not an assertion
        while (engine_stats(app.config.app_name, "ChatIngress")[0]["encoder"]
               ["unfinished_requests"] == 0 and time.monotonic() < deadline):
            time.sleep(0.2)
        core.kill()
        answer = held.result()
    assert assert_envelope(answer, 503)["code"] == "engine_unavailable"
    assert answer.headers["retry-after"]
    assert_still_serving(app.base)
    refused = 0
    deadline = time.monotonic() + 600  # a guard, not an assertion
    while time.monotonic() < deadline:
        resp = post_chat(app.base, {"model": ENCODER, "input": ["a cat"]}, path="/embeddings")
        if resp.status_code == 200:
            break
        assert assert_envelope(resp, 503)["code"] == "engine_unavailable"
        assert resp.headers["retry-after"]
        refused += 1
        time.sleep(1)
    assert resp.status_code == 200, resp.text
    assert refused  # the client was told to retry, not served by a dead engine
    after = engine_stats(app.config.app_name, "ChatIngress")[0]["encoder"]
    assert after["engine_restarts"] == before["engine_restarts"] + 1
    assert not [p.pid for p in old if alive(p)]
