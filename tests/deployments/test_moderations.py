"""/v1/moderations through the running app with the demo CLIP encoder: OpenAI's response as
the openai SDK parses it, deterministic, thresholds honoured, image-dependent scores, the
linear-head path, and bad inputs as 400s. (The demo encoder has random weights: its scores
mean nothing, their mechanics do.)"""

from __future__ import annotations

import math
from typing import Any

import openai
import pytest

from handlers.moderation import CATEGORIES, IMAGE_CATEGORIES, ModerationSettings
from tests.images import data_uri, encode, natural
from tests.support import (
    API_KEY,
    ENCODER,
    HEAD_BIAS,
    HEAD_CATEGORY,
    HEAD_WEIGHT,
    IrisApp,
    assert_envelope,
    post_chat,
)


@pytest.fixture(scope="module")
def app(iris_apps: dict[str, IrisApp]) -> IrisApp:
    return iris_apps["local"]


@pytest.fixture(scope="module")
def client(app: IrisApp) -> openai.OpenAI:
    return openai.OpenAI(base_url=app.base, api_key=API_KEY, max_retries=0, timeout=120)


def image(seed: int) -> dict[str, Any]:
    url = data_uri(encode(natural(160, 120, seed=seed), "JPEG"), "image/jpeg")
    return {"type": "image_url", "image_url": {"url": url}}


def test_the_sdk_parses_text_and_image_results(client: openai.OpenAI) -> None:
    text = client.moderations.create(model=ENCODER, input=["hello there", "good morning"])
    assert len(text.results) == 2
    multi = client.moderations.create(model=ENCODER, input=[
        {"type": "text", "text": "look at this"}, image(7)])
    (result,) = multi.results  # one result for the whole multimodal input
    scores = result.category_scores.model_dump(by_alias=True)
    applied = result.category_applied_input_types.model_dump(by_alias=True)
    assert set(scores) == set(CATEGORIES)
    for name in CATEGORIES:
        assert 0.0 <= scores[name] <= 1.0
        want = ["text", "image"] if name in IMAGE_CATEGORIES else ["text"]
        assert applied[name] == want, name


def test_scores_are_deterministic_and_flags_follow_the_thresholds(app: IrisApp) -> None:
    body = {"model": ENCODER, "input": [{"type": "text", "text": "a quiet street"}, image(8)]}
    first = post_chat(app.base, body, path="/moderations").json()["results"][0]
    second = post_chat(app.base, body, path="/moderations").json()["results"][0]
    assert first["category_scores"] == second["category_scores"]
    thresholds = {n: c.threshold for n, c in ModerationSettings().categories.items() if c}
    for name, score in first["category_scores"].items():
        if name in thresholds and name != HEAD_CATEGORY:
            assert first["categories"][name] == (score >= thresholds[name]), name
    assert first["flagged"] == any(first["categories"].values())


def test_image_scores_depend_on_the_image(app: IrisApp) -> None:
    def scores(part: dict[str, Any]) -> dict[str, float]:
        resp = post_chat(app.base, {"model": ENCODER, "input": [part]}, path="/moderations")
        assert resp.status_code == 200, resp.text
        s: dict[str, float] = resp.json()["results"][0]["category_scores"]
        return s

    a, b = scores(image(9)), scores(image(10))
    assert any(a[c] != b[c] for c in IMAGE_CATEGORIES)
    assert all(a[c] == 0.0 for c in CATEGORIES if c not in IMAGE_CATEGORIES)  # text-only


def test_the_linear_head_scores_its_category(app: IrisApp) -> None:
    """The session app's head covers one category: its score is sigmoid(w.x + b) on the
    text's normalised embedding, as /v1/embeddings returns it."""
    text = "a short sentence"
    emb = post_chat(app.base, {"model": ENCODER, "input": text, "encoding_format": "float"},
                    path="/embeddings").json()["data"][0]["embedding"]
    norm = math.sqrt(sum(v * v for v in emb))
    want = 1 / (1 + math.exp(-(sum(w * v / norm for w, v in zip(HEAD_WEIGHT, emb,
                                                                 strict=True)) + HEAD_BIAS)))
    got = post_chat(app.base, {"model": ENCODER, "input": text}, path="/moderations").json()
    result = got["results"][0]
    assert abs(result["category_scores"][HEAD_CATEGORY] - want) < 1e-5
    assert result["categories"][HEAD_CATEGORY] == (want >= 0.5)


@pytest.mark.parametrize(("body", "status", "param"), [
    ({"model": ENCODER, "input": ""}, 400, "input"),
    ({"model": ENCODER, "input": []}, 400, "input"),
    ({"model": ENCODER, "input": ["x"] * 300}, 400, "input"),
    ({"model": ENCODER, "input": [{"type": "audio", "audio": "x"}]}, 400, "input[0].type"),
    ({"model": ENCODER, "input": [{"type": "image_url", "image_url": {"url": "ftp://x/y"}}]},
     400, "input[0].image_url.url"),
    ({"model": "nope", "input": "x"}, 404, "model"),
])
def test_bad_inputs_are_client_errors(app: IrisApp, body: dict[str, Any], status: int,
                                      param: str) -> None:
    err = assert_envelope(post_chat(app.base, body, path="/moderations"), status)
    assert (err["param"] or "").startswith(param), err


def test_openais_moderation_model_names_mean_the_encoder(client: openai.OpenAI) -> None:
    """Clients written for OpenAI name its moderation models; they get Iris's encoder."""
    for model in ("omni-moderation-latest", "text-moderation-latest"):
        assert client.moderations.create(model=model, input="hi").model == ENCODER
    assert client.moderations.create(input="hi").model == ENCODER  # no model at all
