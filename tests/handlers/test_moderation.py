"""/v1/moderations: request parsing and refusals, the settings and their defaults, zero-shot and
linear-head scoring on synthetic normalised embeddings, and responses read back through the
openai SDK's own types and client."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any, get_args

import httpx
import numpy as np
import openai
import pydantic
import pytest
from openai.types import ModerationCreateResponse
from openai.types.moderation import CategoryAppliedInputTypes, CategoryScores

from handlers.errors import InvalidRequest
from handlers.moderation import (
    CATEGORIES,
    DEFAULT_CATEGORY_PROMPTS,
    DEFAULT_NEUTRAL_PROMPTS,
    DEFAULT_THRESHOLDS,
    IMAGE_CATEGORIES,
    InputKind,
    ModerationSettings,
)
from handlers.moderation_head import HeadError, load_head
from handlers.moderation_request import ModerationPart, ModerationRequest, parse_moderation_request
from handlers.moderation_scoring import (
    CLIP_LOGIT_SCALE,
    ModerationResult,
    Scorer,
    logit_scale,
    moderation_response,
    new_moderation_id,
    prompt_texts,
)

PNG = "data:image/png;base64,iVBORw0KGgo="
MAX = 4
DIM = 48
TEXT_ONLY = [c for c in CATEGORIES if c not in IMAGE_CATEGORIES]


def parse(input: Any, **extra: Any) -> ModerationRequest:
    return parse_moderation_request({"input": input, **extra}, MAX)


def refused(body: Any) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as info:
        parse_moderation_request(body, MAX)
    assert info.value.status == 400 and info.value.type == "invalid_request_error"
    return info.value


# --- requests -------------------------------------------------------------------------------


def test_a_string_is_one_input() -> None:
    req = parse("some text")
    assert req.model is None
    assert [inp.parts for inp in req.inputs] == [(ModerationPart("text", "input", "some text"),)]


def test_a_list_of_strings_is_one_result_each() -> None:
    req = parse(["a", "b", "c"], model="omni-moderation-latest")
    assert req.model == "omni-moderation-latest"
    assert [[(p.kind, p.param, p.text) for p in inp.parts] for inp in req.inputs] == [
        [("text", "input[0]", "a")], [("text", "input[1]", "b")], [("text", "input[2]", "c")]]


def test_a_list_of_parts_is_one_input() -> None:
    req = parse([
        {"type": "text", "text": "caption"},
        {"type": "image_url", "image_url": {"url": PNG}},
        {"type": "image_url", "image_url": "https://example.com/a.png"},
        {"type": "input_image", "image_url": PNG},
    ])
    assert len(req.inputs) == 1
    assert [(p.kind, p.param, p.text, p.url) for p in req.parts] == [
        ("text", "input[0].text", "caption", None),
        ("image", "input[1].image_url", None, PNG),
        ("image", "input[2].image_url", None, "https://example.com/a.png"),
        ("image", "input[3].image_url", None, PNG),
    ]


def body(input: Any, **extra: Any) -> dict[str, Any]:
    return {"input": input, **extra}


BAD: list[tuple[str, Any, str | None, str | None]] = [
    ("not-an-object", "text", None, None),
    ("no-input", {"model": "m"}, "input", None),
    ("model-not-a-string", body("a", model=3), "model", None),
    ("input-null", body(None), "input", None),
    ("input-a-number", body(7), "input", None),
    ("empty-string", body(""), "input", None),
    ("empty-list", body([]), "input", None),
    ("empty-string-in-list", body(["a", ""]), "input[1]", None),
    ("non-string-in-list", body(["a", 3]), "input[1]", None),
    ("too-many-strings", body(["a"] * (MAX + 1)), "input", "too_many_inputs"),
    ("too-many-parts", body([{"type": "text", "text": "a"}] * (MAX + 1)), "input",
     "too_many_inputs"),
    ("string-among-parts", body(["a", {"type": "text", "text": "b"}]), "input[0]", None),
    ("part-without-type", body([{"type": "text", "text": "a"}, {"text": "b"}]), "input[1]",
     None),
    ("unknown-part-type", body([{"type": "text", "text": "a"}, {"type": "input_audio"}]),
     "input[1].type", None),
    ("text-part-without-text", body([{"type": "text"}]), "input[0].text", None),
    ("empty-text-part", body([{"type": "text", "text": ""}]), "input[0].text", None),
    ("empty-image-url", body([{"type": "text", "text": "a"},
                              {"type": "image_url", "image_url": {"url": ""}}]),
     "input[1].image_url.url", None),
    ("image-url-missing-url", body([{"type": "image_url", "image_url": {}}]),
     "input[0].image_url.url", None),
]


@pytest.mark.parametrize(("case", "payload", "param", "code"), BAD, ids=[b[0] for b in BAD])
def test_refusals_name_the_field(case: str, payload: Any, param: str | None,
                                 code: str | None) -> None:
    err = refused(payload)
    assert (err.param, err.code) == (param, code), err.message


def test_ids_are_unique_moderation_ids() -> None:
    a, b = new_moderation_id(), new_moderation_id()
    assert a.startswith("modr-") and a != b


# --- categories and settings ----------------------------------------------------------------


def sdk_names(model: type[pydantic.BaseModel]) -> list[str]:
    return [f.alias or name for name, f in model.model_fields.items()]


def test_categories_and_image_categories_match_the_sdk() -> None:
    assert list(CATEGORIES) == sdk_names(CategoryScores)
    with_image = {f.alias or name for name, f in CategoryAppliedInputTypes.model_fields.items()
                  if "image" in get_args(get_args(f.annotation)[0])}
    assert set(IMAGE_CATEGORIES) == with_image
    assert len(TEXT_ONLY) == 7


def test_defaults_cover_every_category() -> None:
    s = ModerationSettings()
    assert list(s.categories) == list(CATEGORIES)
    assert set(DEFAULT_CATEGORY_PROMPTS) == set(DEFAULT_THRESHOLDS) == set(CATEGORIES)
    assert all(c is not None and 0 < c.threshold < 1 and len(c.prompts) >= 2
               for c in s.categories.values())
    assert s.neutral_prompts == DEFAULT_NEUTRAL_PROMPTS and s.temperature is None
    assert s.head is None
    # Every field of the section says what it means.
    assert all(f.description for f in ModerationSettings.model_fields.values())
    texts = prompt_texts(s)
    assert len(texts) == len(set(texts))
    assert set(texts) == set(DEFAULT_NEUTRAL_PROMPTS).union(*DEFAULT_CATEGORY_PROMPTS.values())


def test_categories_merge_over_the_defaults_and_null_drops_one() -> None:
    s = ModerationSettings.model_validate({"categories": {
        "sexual": {"threshold": 0.8},
        "hate": {"prompts": ["a hateful meme"]},
        "illicit": None,
    }})
    sexual, hate = s.categories["sexual"], s.categories["hate"]
    assert sexual is not None and hate is not None
    assert sexual.threshold == 0.8 and sexual.prompts == DEFAULT_CATEGORY_PROMPTS["sexual"]
    assert hate.prompts == ["a hateful meme"] and hate.threshold == DEFAULT_THRESHOLDS["hate"]
    assert s.categories["illicit"] is None and list(s.categories) == list(CATEGORIES)
    assert "a hateful meme" in prompt_texts(s)
    assert not set(DEFAULT_CATEGORY_PROMPTS["illicit"]) & set(prompt_texts(s))
    # A dump loads back to the same settings (the dropped category stays dropped).
    assert ModerationSettings.model_validate(s.model_dump()) == s
    assert ModerationSettings.model_validate(json.loads(s.model_dump_json())) == s


@pytest.mark.parametrize("bad", [
    {"categories": {"nsfw": {"threshold": 0.5}}},
    {"categories": {"sexual": {"threshold": 1.0}}},
    {"categories": {"sexual": {"threshold": 0}}},
    {"categories": {"sexual": {"prompts": []}}},
    {"categories": {"sexual": {"prompts": ["  "]}}},
    {"categories": {"sexual": {"weight": 2}}},
    {"neutral_prompts": []},
    {"neutral_prompts": ["a landscape", "a sexually explicit image"]},
    {"temperature": 0},
    {"threshold": 0.5},
])
def test_bad_settings_are_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(pydantic.ValidationError):
        ModerationSettings.model_validate(bad)


def test_logit_scale() -> None:
    s = ModerationSettings()
    assert logit_scale(s, None) == CLIP_LOGIT_SCALE == 100.0
    assert logit_scale(s, 42.0) == 42.0
    assert logit_scale(ModerationSettings(temperature=0.05), 42.0) == pytest.approx(20.0)


# --- scoring --------------------------------------------------------------------------------


def unit(v: np.ndarray) -> list[float]:
    out: list[float] = (v / np.linalg.norm(v)).tolist()
    return out


def embed(text: str) -> np.ndarray:
    """A fixed random direction per text: distinct texts are near-orthogonal in DIM dims."""
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
    return np.random.default_rng(seed).standard_normal(DIM)


def prompt_embeddings(settings: ModerationSettings) -> dict[str, list[float]]:
    return {p: unit(embed(p)) for p in prompt_texts(settings)}


def scorer(settings: ModerationSettings | None = None, scale: float = CLIP_LOGIT_SCALE,
           **kw: Any) -> Scorer:
    settings = settings or ModerationSettings()
    return Scorer(settings, prompt_embeddings(settings), scale, **kw)


def near(prompt: str, other: str = "an ordinary photo", mix: float = 0.0) -> list[float]:
    """A unit vector on the arc from `prompt`'s embedding (mix 0) to `other`'s (mix 1)."""
    a, b = np.asarray(unit(embed(prompt))), np.asarray(unit(embed(other)))
    return unit((1 - mix) * a + mix * b)


def softmax_mass(x: list[float], own: list[str], neutral: list[str], s: float) -> float:
    """The spec, written out: softmax over s*cos with the category's prompts and the neutral
    ones; the mass on the category's."""
    def cos(p: str) -> float:
        return float(np.dot(x, unit(embed(p))))
    own_w = [math.exp(s * cos(p)) for p in own]
    all_w = own_w + [math.exp(s * cos(p)) for p in neutral]
    return sum(own_w) / sum(all_w)


def test_zero_shot_score_is_the_softmax_mass_on_the_category_prompts() -> None:
    settings = ModerationSettings()
    x = near("a nude photo", mix=0.6)
    for s in (10.0, CLIP_LOGIT_SCALE):
        got = scorer(settings, s).score_vector(x, "image")
        want = softmax_mass(x, settings.categories["sexual"].prompts,
                            settings.neutral_prompts, s)
        assert got["sexual"] == pytest.approx(want, rel=1e-9)


def test_scoring_is_deterministic() -> None:
    x = near("a person being shot", mix=0.5)
    first = scorer().moderate([("text", x), ("image", x)])
    again = scorer().moderate([("text", x), ("image", x)])
    assert first == again
    assert scorer().score_vector(x, "text") == scorer().score_vector(x, "text")


def test_scores_depend_on_the_image() -> None:
    sc = scorer()
    close = sc.score_vector(near("a sexually explicit image", mix=0.2), "image")
    far = sc.score_vector(near("a landscape"), "image")
    assert close["sexual"] > 0.9 > 0.01 > far["sexual"]
    res_close = sc.moderate([("image", near("a sexually explicit image", mix=0.2))])
    res_far = sc.moderate([("image", near("a landscape"))])
    assert res_close.categories["sexual"] and res_close.flagged
    assert not res_far.categories["sexual"] and not res_far.flagged
    gory = sc.score_vector(near("a gory image of a dead body", mix=0.2), "image")
    assert gory["violence/graphic"] > 0.9 and gory["sexual"] < 0.1


def test_input_vectors_need_not_be_normalised() -> None:
    sc = scorer()
    x = np.asarray(near("pornography", mix=0.4))
    assert sc.score_vector((3.0 * x).tolist(), "image") == pytest.approx(
        sc.score_vector(x.tolist(), "image"))


def only(name: str, threshold: float) -> ModerationSettings:
    """Settings scoring one category (every other one dropped)."""
    cats: dict[str, Any] = dict.fromkeys(CATEGORIES)
    cats[name] = {"threshold": threshold}
    return ModerationSettings.model_validate({"categories": cats})


def test_a_score_just_above_or_below_the_threshold_flips_flagged() -> None:
    x = near("a violent attack on a person", mix=0.55)
    score = scorer(only("violence", 0.5), 10.0).score_vector(x, "image")["violence"]
    assert 0.05 < score < 0.95
    below = scorer(only("violence", score - 1e-6), 10.0).moderate([("image", x)])
    above = scorer(only("violence", score + 1e-6), 10.0).moderate([("image", x)])
    at = scorer(only("violence", score), 10.0).moderate([("image", x)])
    assert below.categories["violence"] and below.flagged
    assert at.categories["violence"] and at.flagged  # score >= threshold flags
    assert not above.categories["violence"] and not above.flagged
    assert below.category_scores["violence"] == above.category_scores["violence"] == score


def test_dropped_categories_report_zero_and_never_flag() -> None:
    res = scorer(only("violence", 0.5)).moderate([("text", near("pornography"))])
    assert res.category_scores["sexual"] == 0.0 and not res.categories["sexual"]
    assert res.category_applied_input_types["sexual"] == []
    assert res.category_applied_input_types["violence"] == ["text"]


def test_text_only_categories_are_never_scored_on_images() -> None:
    sc = scorer()
    # An image right on a text-only category's prompt: still not scored for it.
    res = sc.moderate([("image", near("hateful slurs against an ethnic group"))])
    for c in TEXT_ONLY:
        assert res.category_applied_input_types[c] == []
        assert res.category_scores[c] == 0.0 and not res.categories[c]
    for c in IMAGE_CATEGORIES:
        assert res.category_applied_input_types[c] == ["image"]
    assert set(sc.score_vector(near("a landscape"), "image")) == IMAGE_CATEGORIES
    assert set(sc.score_vector(near("a landscape"), "text")) == set(CATEGORIES)
    text = sc.moderate([("text", near("hateful slurs against an ethnic group", mix=0.2))])
    assert text.categories["hate"] and text.category_applied_input_types["hate"] == ["text"]


def test_a_multi_part_input_takes_the_max_per_category() -> None:
    sc = scorer()
    text = near("a threat to kill or injure a person", mix=0.3)
    image = near("a graphic photo of a bloody wound", mix=0.3)
    calm = near("a photo of food")
    t, i, c = (sc.score_vector(text, "text"), sc.score_vector(image, "image"),
               sc.score_vector(calm, "image"))
    res = sc.moderate([("text", text), ("image", image), ("image", calm)])
    for cat in CATEGORIES:
        want = max([t[cat], i.get(cat, 0.0), c.get(cat, 0.0)])
        assert res.category_scores[cat] == want
    assert res.category_scores["violence/graphic"] == i["violence/graphic"]
    assert res.category_scores["harassment/threatening"] == t["harassment/threatening"]
    assert res.categories["violence/graphic"] and res.categories["harassment/threatening"]
    assert res.category_applied_input_types["violence/graphic"] == ["text", "image"]
    assert res.category_applied_input_types["harassment/threatening"] == ["text"]
    # The same parts in another order give the same result.
    assert sc.moderate([("image", calm), ("image", image), ("text", text)]) == res


def test_scorer_refuses_missing_or_mismatched_prompt_embeddings() -> None:
    settings = ModerationSettings()
    emb = prompt_embeddings(settings)
    del emb["a landscape"]
    with pytest.raises(ValueError, match="a landscape"):
        Scorer(settings, emb, CLIP_LOGIT_SCALE)
    emb = prompt_embeddings(settings)
    emb["pornography"] = emb["pornography"][:-1]
    with pytest.raises(ValueError, match="dimension"):
        Scorer(settings, emb, CLIP_LOGIT_SCALE)
    with pytest.raises(ValueError, match="expected"):
        scorer().score_vector([1.0] * (DIM + 1), "text")
    with pytest.raises(ValueError, match="norm"):
        scorer().score_vector([0.0] * DIM, "text")
    with pytest.raises(ValueError, match="logit scale"):
        scorer(scale=0.0)


# --- linear head ----------------------------------------------------------------------------


def write_head(tmp_path: Path, spec: dict[str, Any]) -> Path:
    path = tmp_path / "head.json"
    path.write_text(json.dumps(spec))
    return path


def head_spec(dim: int = DIM) -> dict[str, Any]:
    rng = np.random.default_rng(7)
    return {"dim": dim, "categories": {
        "sexual": {"weight": rng.standard_normal(dim).tolist(), "bias": -0.5, "threshold": 0.7},
        "hate": {"weight": rng.standard_normal(dim).tolist(), "bias": 0.25},
    }}


def sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


def test_a_linear_head_scores_its_categories_with_a_sigmoid(tmp_path: Path) -> None:
    spec = head_spec()
    head = load_head(write_head(tmp_path, spec), DIM)
    assert head.dim == DIM and set(head.names) == {"sexual", "hate"}
    # Drop hate from the zero-shot settings: the head still scores it.
    settings = ModerationSettings.model_validate({"categories": {"hate": None}})
    sc = Scorer(settings, prompt_embeddings(settings), CLIP_LOGIT_SCALE, head=head)
    raw = 2.0 * np.asarray(near("a landscape", mix=0.3))  # scored after normalising
    x = unit(raw)
    got = sc.score_vector(raw.tolist(), "text")
    for name in ("sexual", "hate"):
        cat = spec["categories"][name]
        want = sigmoid(float(np.dot(cat["weight"], x)) + cat["bias"])
        assert got[name] == pytest.approx(want, rel=1e-9)
    # The other categories stay zero-shot.
    assert got["violence"] == scorer(settings).score_vector(raw.tolist(), "text")["violence"]
    # Thresholds: the head's own, else the settings' (hate has neither: 0.5).
    assert sc.thresholds["sexual"] == 0.7 and sc.thresholds["hate"] == 0.5
    # hate is text-only, even from a head.
    assert "hate" not in sc.score_vector(x, "image")


def test_head_thresholds_decide_flagged(tmp_path: Path) -> None:
    spec = {"dim": DIM, "categories": {"violence": {"weight": [0.0] * DIM, "bias": 0.0}}}
    x = near("a landscape")
    for threshold, flagged in ((0.49, True), (0.51, False)):
        spec["categories"]["violence"]["threshold"] = threshold
        head = load_head(write_head(tmp_path, spec), DIM)
        res = scorer(only("violence", 0.9), head=head).moderate([("image", x)])
        assert res.category_scores["violence"] == 0.5  # sigmoid(0)
        assert res.categories["violence"] is flagged and res.flagged is flagged


@pytest.mark.parametrize(("mutate", "dim", "match"), [
    (lambda s: s, 64, "dim is 48 but the encoder's embeddings have 64"),
    (lambda s: {**s, "dim": 64}, 64, "weight has 48 values"),
    (lambda s: {**s, "categories": {"nsfw": s["categories"]["sexual"]}}, DIM,
     "unknown categories"),
    (lambda s: {**s, "categories": {}}, DIM, "categories"),
    (lambda s: {**s, "categories": {"sexual": {"weight": [1.0] * DIM}}}, DIM, "bias"),
    (lambda s: {**s, "categories": {"sexual": {**s["categories"]["sexual"], "threshold": 2}}},
     DIM, "threshold"),
    (lambda s: {**s, "dim": "48"}, DIM, "dim"),
    (lambda s: {**s, "extra": 1}, DIM, "extra"),
])
def test_bad_heads_are_refused(tmp_path: Path, mutate: Any, dim: int, match: str) -> None:
    path = write_head(tmp_path, mutate(head_spec()))
    with pytest.raises(HeadError, match=match) as info:
        load_head(path, dim)
    assert str(path) in str(info.value)


def test_unreadable_head_is_refused(tmp_path: Path) -> None:
    with pytest.raises(HeadError, match="JSON"):
        load_head(tmp_path / "missing.json", DIM)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(HeadError, match="JSON"):
        load_head(bad, DIM)


def test_a_head_must_match_the_prompt_embeddings(tmp_path: Path) -> None:
    head = load_head(write_head(tmp_path, head_spec(DIM + 2)), DIM + 2)
    with pytest.raises(ValueError, match="dim"):
        scorer(head=head)


# --- responses ------------------------------------------------------------------------------


def test_response_has_every_category_and_validates() -> None:
    sc = scorer()
    results = [sc.moderate([("text", near("pornography", mix=0.2))]),
               sc.moderate([("image", near("a landscape"))])]
    out = moderation_response(results, "iris-moderation", "modr-1")
    parsed = ModerationCreateResponse.model_validate(out)
    assert parsed.id == "modr-1" and parsed.model == "iris-moderation"
    assert len(parsed.results) == 2
    for r in out["results"]:
        for key in ("categories", "category_scores", "category_applied_input_types"):
            assert list(r[key]) == list(CATEGORIES)
    assert parsed.results[0].flagged and parsed.results[0].categories.sexual
    assert not parsed.results[1].flagged
    assert parsed.results[1].category_applied_input_types.hate == []
    assert parsed.results[1].category_applied_input_types.violence == ["image"]
    assert json.loads(json.dumps(out)) == out


def test_an_unflagged_result_from_a_hand_built_result_validates() -> None:
    res = ModerationResult(
        flagged=False,
        categories=dict.fromkeys(CATEGORIES, False),
        category_scores=dict.fromkeys(CATEGORIES, 0.0),
        category_applied_input_types={c: [] for c in CATEGORIES},
    )
    ModerationCreateResponse.model_validate(moderation_response([res], "m", "modr-x"))


def sdk_client(sc: Scorer, seen: list[ModerationRequest]) -> openai.OpenAI:
    """A server made of this module: parse, embed each part (texts by their content, images by
    their URL), score, answer."""
    # What the fake encoder makes of the texts that are not prompts.
    means = {"hello there": "a friendly conversation", "look at this": "a photo of people at work"}

    def vector(kind: InputKind, value: str) -> list[float]:
        return near(means.get(value, value), mix=0.2)

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v1/moderations"
        req = parse_moderation_request(json.loads(request.content), MAX)
        seen.append(req)
        results = [sc.moderate([(p.kind, vector(p.kind, p.text or p.url or ""))
                                for p in inp.parts]) for inp in req.inputs]
        return httpx.Response(200, json=moderation_response(
            results, req.model or "iris-moderation", new_moderation_id()))

    return openai.OpenAI(base_url="http://test/v1", api_key="x", max_retries=0,
                         http_client=httpx.Client(transport=httpx.MockTransport(handler)))


def test_through_the_sdk_client() -> None:
    seen: list[ModerationRequest] = []
    client = sdk_client(scorer(), seen)
    texts = client.moderations.create(input=["an explicit description of sex", "hello there"])
    assert len(texts.results) == 2 and texts.model == "iris-moderation"
    assert texts.results[0].categories.sexual and not texts.results[1].flagged
    mm = client.moderations.create(model="omni-moderation-latest", input=[
        {"type": "text", "text": "look at this"},
        {"type": "image_url", "image_url": {"url": "a gory image of a dead body"}},
    ])
    assert len(mm.results) == 1 and mm.model == "omni-moderation-latest"
    assert [p.kind for p in seen[1].parts] == ["text", "image"]
    r = mm.results[0]
    assert r.flagged and r.categories.violence_graphic
    assert r.category_applied_input_types.violence_graphic == ["text", "image"]
    assert r.category_applied_input_types.hate == ["text"]
