"""POST /v1/moderations: OpenAI's omni-moderation wire format, scored zero-shot from a
CLIP-style encoder's normalised embeddings (or by a linear head over them).

Request: `input` is a string (one result), a list of strings (one result each), or a list of
`{"type": "text", "text"}` / `{"type": "image_url", "image_url": {"url"}}` parts (ONE result
for the whole list, as OpenAI does). `model` is optional. Empty strings, empty lists, lists
mixing strings with parts, and unknown part types are refused, naming the field.

Scoring, for an input's L2-normalised embedding x and logit scale s (see `Scorer`):

    logits = s * cos(x, t) for t in prompts(c) + neutral_prompts
    score_c = sum of softmax(logits) over the prompts(c) entries

the probability mass x puts on c's descriptions against the neutral ones. With a linear head
configured, score_c = sigmoid(w_c . x + b_c) for the categories it covers instead. A category
flags when score_c >= its threshold. Text-only categories are scored on text parts only; the
image categories (self-harm and its two sub-categories, sexual, violence, violence/graphic: the
SDK's `CategoryAppliedInputTypes`) on text and image parts. A multi-part input takes, per
category, the max over the parts scored for it, and lists their input types in
`category_applied_input_types`. A category scored on no part (or not configured) reports 0.0,
not flagged, and [].

The default prompts and thresholds are uncalibrated starting points: measure them against
labelled data for the encoder you serve (or train a linear head) before trusting them.
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    ValidationError,
    field_validator,
    model_validator,
)

from handlers.embeddings import IMAGE_PART_TYPES, TEXT_PART_TYPES, image_item
from handlers.errors import InvalidRequest
from handlers.protocol import Detail, validated, validation_message

InputKind = Literal["text", "image"]
Vector = npt.NDArray[np.float64]

# OpenAI's categories, in the SDK's order.
CATEGORIES: tuple[str, ...] = (
    "harassment",
    "harassment/threatening",
    "hate",
    "hate/threatening",
    "illicit",
    "illicit/violent",
    "self-harm",
    "self-harm/instructions",
    "self-harm/intent",
    "sexual",
    "sexual/minors",
    "violence",
    "violence/graphic",
)
# Categories scored on images too (openai.types.moderation.CategoryAppliedInputTypes).
IMAGE_CATEGORIES: frozenset[str] = frozenset({
    "self-harm",
    "self-harm/instructions",
    "self-harm/intent",
    "sexual",
    "violence",
    "violence/graphic",
})
INPUT_KINDS: tuple[InputKind, ...] = ("text", "image")

# Short descriptions that fit both a text and a picture (CLIP embeds both in one space).
DEFAULT_CATEGORY_PROMPTS: dict[str, list[str]] = {
    "harassment": [
        "an insulting message bullying a person",
        "abusive name-calling aimed at someone",
        "a text mocking and humiliating someone",
    ],
    "harassment/threatening": [
        "a message threatening to hurt someone",
        "a threat to kill or injure a person",
        "an intimidating message promising violence against someone",
    ],
    "hate": [
        "hateful slurs against an ethnic group",
        "a message demeaning people because of their religion",
        "racist propaganda",
        "a hate symbol",
    ],
    "hate/threatening": [
        "a call for violence against an ethnic group",
        "a threat to attack people because of their religion",
        "propaganda calling for the extermination of a people",
    ],
    "illicit": [
        "instructions on how to shoplift",
        "advice on committing fraud",
        "how to buy illegal drugs",
        "a guide to hacking into someone's account",
    ],
    "illicit/violent": [
        "instructions for building a weapon",
        "how to make a bomb",
        "a plan to attack people with a weapon",
    ],
    "self-harm": [
        "a photo of self-inflicted cuts on an arm",
        "a person attempting suicide",
        "content promoting an eating disorder",
    ],
    "self-harm/instructions": [
        "instructions on how to commit suicide",
        "advice on how to hurt yourself",
        "tips for hiding self-harm or starving yourself",
    ],
    "self-harm/intent": [
        "a person saying they want to kill themselves",
        "a message from someone planning to end their life",
        "someone saying they are going to hurt themselves",
    ],
    "sexual": [
        "a sexually explicit image",
        "pornography",
        "a nude photo",
        "an explicit description of sex",
    ],
    "sexual/minors": [
        "sexual content involving a minor",
        "a sexualised description of a child",
    ],
    "violence": [
        "a photo of people fighting",
        "a violent attack on a person",
        "a person being shot",
        "a description of someone being beaten",
    ],
    "violence/graphic": [
        "a graphic photo of a bloody wound",
        "a gory image of a dead body",
        "a graphic description of mutilation and blood",
    ],
}
DEFAULT_NEUTRAL_PROMPTS: list[str] = [
    "an ordinary photo",
    "a picture of everyday objects",
    "a screenshot of a document",
    "a landscape",
    "a photo of people at work",
    "a photo of food",
    "a photo of an animal",
    "a chart or diagram",
    "a friendly conversation",
    "a question about a product",
    "a news article",
    "a piece of source code",
]
# 0.5: closer to the category's descriptions than to the neutral ones, on balance. Lower for
# the categories where a miss costs most (more false positives, fewer misses).
DEFAULT_THRESHOLDS: dict[str, float] = {
    **dict.fromkeys(CATEGORIES, 0.5),
    "self-harm": 0.4,
    "self-harm/instructions": 0.4,
    "self-harm/intent": 0.4,
    "sexual/minors": 0.4,
}
# A linear head's category with no threshold of its own, and none in the settings.
DEFAULT_HEAD_THRESHOLD = 0.5
# OpenAI CLIP's trained logit scale (exp of the stored parameter, clamped at 100 in training).
CLIP_LOGIT_SCALE = 100.0


def default_categories() -> dict[str, dict[str, Any]]:
    """The default `categories` section as plain data (a fresh copy)."""
    return {
        name: {"prompts": list(DEFAULT_CATEGORY_PROMPTS[name]),
               "threshold": DEFAULT_THRESHOLDS[name]}
        for name in CATEGORIES
    }


def _non_empty(prompts: list[str]) -> list[str]:
    for i, p in enumerate(prompts):
        if not p.strip():
            raise ValueError(f"prompt {i} is empty")
    return prompts


class CategorySettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompts: list[str] = Field(
        min_length=1,
        description="Short descriptions of content in this category (for text and, for the "
        "image categories, pictures), each embedded once at start; scored against "
        "neutral_prompts.",
    )
    threshold: float = Field(
        gt=0, lt=1,
        description="The category flags when its score is at least this (a linear head's own "
        "threshold for the category, if its file gives one, wins).",
    )

    _prompts = field_validator("prompts")(_non_empty)


def _default_category_settings() -> dict[str, CategorySettings | None]:
    return {k: CategorySettings.model_validate(v) for k, v in default_categories().items()}


class ModerationSettings(BaseModel):
    """How /v1/moderations scores inputs. `categories` merges over the defaults category by
    category (a partial entry keeps the default for the fields it omits); a null entry turns
    that category off and stays in the dict (as null), so a dump loads back the same."""

    model_config = ConfigDict(extra="forbid")
    categories: dict[str, CategorySettings | None] = Field(
        default_factory=_default_category_settings,
        description="Zero-shot prompts and threshold per OpenAI category, merged over the "
        "defaults: {name: {prompts?, threshold?}}; {name: null} stops scoring that category "
        "(it reports 0.0, never flagged, unless a linear head covers it). Names are OpenAI's "
        "13 (e.g. 'violence/graphic').",
    )
    neutral_prompts: list[str] = Field(
        default_factory=lambda: list(DEFAULT_NEUTRAL_PROMPTS),
        min_length=1,
        description="Descriptions of harmless content every category is scored against: a "
        "category's score is the softmax mass on its own prompts among its prompts and these.",
    )
    temperature: float | None = Field(
        None, gt=0,
        description="Softmax temperature over cosine similarities (logit scale = "
        "1/temperature). null: the encoder's own logit scale (100 for OpenAI's CLIP).",
    )
    head: str | None = Field(
        None,
        description="Path to a linear head (JSON: {dim, categories: {name: {weight, bias, "
        "threshold?}}}) trained on the encoder's normalised embeddings; its categories are "
        "scored sigmoid(w.x + b) instead of zero-shot. Its dim must match the encoder's.",
    )

    _neutral = field_validator("neutral_prompts")(_non_empty)

    @field_validator("categories", mode="before")
    @classmethod
    def _merge_defaults(cls, value: Any) -> Any:
        if not isinstance(value, Mapping):
            return value
        unknown = sorted(set(value) - set(CATEGORIES))
        if unknown:
            raise ValueError(f"unknown categories {unknown}; known: {list(CATEGORIES)}")
        merged: dict[str, Any] = default_categories()
        for name, entry in value.items():
            # A partial entry keeps the defaults it omits; anything else (a CategorySettings,
            # null, or a wrong type for pydantic to name) replaces the default.
            merged[name] = {**merged[name], **entry} if isinstance(entry, Mapping) else entry
        return merged

    @model_validator(mode="after")
    def _disjoint(self) -> ModerationSettings:
        neutral = set(self.neutral_prompts)
        for name, cat in self.categories.items():
            if cat is None:
                continue
            both = sorted(neutral.intersection(cat.prompts))
            if both:
                raise ValueError(f"categories[{name!r}] shares prompts with neutral_prompts: "
                                 f"{both}")
        return self


def prompt_texts(settings: ModerationSettings) -> list[str]:
    """Every distinct prompt the encoder must embed (once, at start), in a stable order."""
    seen: dict[str, None] = {}
    for name in CATEGORIES:
        cat = settings.categories.get(name)
        if cat is not None:
            seen.update(dict.fromkeys(cat.prompts))
    seen.update(dict.fromkeys(settings.neutral_prompts))
    return list(seen)


def logit_scale(settings: ModerationSettings, encoder_logit_scale: float | None) -> float:
    """The multiplier on cosine similarities: 1/temperature when set, else the encoder's
    (the multiplier, i.e. exp of CLIP's stored `logit_scale`), else CLIP's 100."""
    if settings.temperature is not None:
        return 1.0 / settings.temperature
    if encoder_logit_scale is not None:
        return encoder_logit_scale
    return CLIP_LOGIT_SCALE


# --- request --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModerationPart:
    """One text or image to embed. `param` names it in the request (`input`, `input[2]`, or
    for an image `input[1].image_url`, ready for `IrisError.with_param`)."""

    kind: InputKind
    param: str
    text: str | None = None
    url: str | None = None
    detail: Detail | None = None


@dataclass(frozen=True)
class ModerationInput:
    """What one result is computed from: one string, or all the parts of a multimodal list."""

    parts: tuple[ModerationPart, ...]


class ModerationRequest(BaseModel):
    model_config = ConfigDict(frozen=True)
    model: str | None = None
    inputs: list[ModerationInput]

    @property
    def parts(self) -> list[ModerationPart]:
        """Every part of every input, in request order."""
        return [p for inp in self.inputs for p in inp.parts]


class _ModerationBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    input: Any


def _text_part(value: str, param: str) -> ModerationPart:
    if not value:
        raise InvalidRequest(f"{param} must not be an empty string.", param=param)
    return ModerationPart("text", param, text=value)


def _mm_part(part: Any, index: int) -> ModerationPart:
    prefix = f"input[{index}]"
    if not isinstance(part, dict) or not isinstance(part.get("type"), str):
        raise InvalidRequest(
            f"{prefix} must be a text or image_url part (a list of parts cannot mix in "
            "strings).",
            param=prefix,
        )
    kind = part["type"]
    if kind in TEXT_PART_TYPES:
        text = part.get("text")
        if not isinstance(text, str):
            raise InvalidRequest(f"{prefix}.text must be a string.", param=f"{prefix}.text")
        return _text_part(text, f"{prefix}.text")
    if kind in IMAGE_PART_TYPES:
        url, detail, param = image_item(part, prefix)
        return ModerationPart("image", param, url=url, detail=detail)
    raise InvalidRequest(
        f"{prefix}.type {kind!r} is not supported: parts may be text or image_url.",
        param=f"{prefix}.type",
    )


def _inputs(value: Any, max_items: int) -> list[ModerationInput]:
    if isinstance(value, str):
        return [ModerationInput((_text_part(value, "input"),))]
    if not isinstance(value, list):
        raise InvalidRequest(
            "input must be a string, a list of strings, or a list of text and image_url parts.",
            param="input",
        )
    if not value:
        raise InvalidRequest("input must not be an empty list.", param="input")
    if len(value) > max_items:
        raise InvalidRequest(
            f"input has {len(value)} items; at most {max_items} are allowed.",
            param="input",
            code="too_many_inputs",
        )
    if any(isinstance(v, dict) for v in value):
        return [ModerationInput(tuple(_mm_part(v, i) for i, v in enumerate(value)))]
    out: list[ModerationInput] = []
    for i, v in enumerate(value):
        if not isinstance(v, str):
            raise InvalidRequest(
                f"input[{i}] must be a string (or every item a text or image_url part).",
                param=f"input[{i}]",
            )
        out.append(ModerationInput((_text_part(v, f"input[{i}]"),)))
    return out


def parse_moderation_request(body: Any, max_items: int) -> ModerationRequest:
    """The request, every part checked; InvalidRequest names the offending field.
    `max_items` caps the strings of a list of strings, or the parts of a multimodal list."""
    env = validated(_ModerationBody, body)
    return ModerationRequest(model=env.model, inputs=_inputs(env.input, max_items))


def new_moderation_id() -> str:
    return f"modr-{uuid.uuid4().hex}"


# --- linear head ----------------------------------------------------------------------------


class HeadError(ValueError):
    """A linear head file that cannot be used; the message names the file and the field."""


class _HeadCategory(BaseModel):
    model_config = ConfigDict(extra="forbid")
    weight: list[float] = Field(min_length=1)
    bias: float
    threshold: float | None = Field(None, gt=0, lt=1)


class _HeadFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    dim: StrictInt = Field(gt=0)
    categories: dict[str, _HeadCategory] = Field(min_length=1)


def _sigmoid(z: Vector) -> Vector:
    # 0.5 * (1 + tanh(z / 2)): exact sigmoid, no overflow for large |z|.
    out: Vector = 0.5 * (1.0 + np.tanh(0.5 * z))
    return out


@dataclass(frozen=True, eq=False)
class LinearHead:
    """Per-category logistic regression on the L2-normalised embedding."""

    names: tuple[str, ...]
    weight: Vector  # (len(names), dim)
    bias: Vector  # (len(names),)
    thresholds: dict[str, float | None] = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return int(self.weight.shape[1])

    def scores(self, x: Vector) -> dict[str, float]:
        """sigmoid(w_c . x + b_c) per category the head covers, for a normalised x."""
        probs = _sigmoid(self.weight @ x + self.bias)
        return {name: float(p) for name, p in zip(self.names, probs, strict=True)}


def load_head(path: str | Path, dim: int) -> LinearHead:
    """Read and check a head file against the encoder's embedding dimension `dim`."""
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise HeadError(f"moderation head {path}: cannot read it as JSON ({exc}).") from None
    try:
        spec = _HeadFile.model_validate(raw)
    except ValidationError as exc:
        msg, _ = validation_message(exc)
        raise HeadError(f"moderation head {path}: {msg}") from None
    if spec.dim != dim:
        raise HeadError(f"moderation head {path}: dim is {spec.dim} but the encoder's "
                        f"embeddings have {dim} dimensions.")
    unknown = sorted(set(spec.categories) - set(CATEGORIES))
    if unknown:
        raise HeadError(f"moderation head {path}: unknown categories {unknown}.")
    names = tuple(c for c in CATEGORIES if c in spec.categories)
    for name in names:
        cat = spec.categories[name]
        if len(cat.weight) != dim:
            raise HeadError(f"moderation head {path}: categories[{name!r}].weight has "
                            f"{len(cat.weight)} values; dim is {dim}.")
        if not all(math.isfinite(w) for w in cat.weight) or not math.isfinite(cat.bias):
            raise HeadError(f"moderation head {path}: categories[{name!r}] has a non-finite "
                            "weight or bias.")
    return LinearHead(
        names=names,
        weight=np.array([spec.categories[n].weight for n in names], dtype=np.float64),
        bias=np.array([spec.categories[n].bias for n in names], dtype=np.float64),
        thresholds={n: spec.categories[n].threshold for n in names},
    )


# --- scoring --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModerationResult:
    """One result, over all 13 categories."""

    flagged: bool
    categories: dict[str, bool]
    category_scores: dict[str, float]
    category_applied_input_types: dict[str, list[InputKind]]

    def to_dict(self) -> dict[str, Any]:
        return {
            "flagged": self.flagged,
            "categories": dict(self.categories),
            "category_scores": dict(self.category_scores),
            "category_applied_input_types": {
                k: list(v) for k, v in self.category_applied_input_types.items()
            },
        }


def _unit(vector: Sequence[float] | Vector, what: str) -> Vector:
    v = np.asarray(vector, dtype=np.float64)
    if v.ndim != 1 or v.size == 0:
        raise ValueError(f"{what}: expected a non-empty 1-D vector, got shape {v.shape}.")
    norm = float(np.linalg.norm(v))
    if not math.isfinite(norm) or norm == 0.0:
        raise ValueError(f"{what}: the vector has zero or non-finite norm.")
    out: Vector = v / norm
    return out


def zero_shot_score(x: Vector, category: Vector, neutral: Vector, scale: float) -> float:
    """Softmax mass on `category`'s rows among its rows and `neutral`'s, logits
    scale * cos(x, row). All of x and the rows L2-normalised."""
    logits = scale * (np.concatenate([category, neutral]) @ x)
    logits -= logits.max()
    weights = np.exp(logits)
    return float(weights[: category.shape[0]].sum() / weights.sum())


class Scorer:
    """Scores embeddings, built once from the settings, each prompt's embedding (any mapping
    prompt -> vector covering `prompt_texts(settings)`), the logit scale and an optional
    head. Pure numpy, deterministic."""

    def __init__(
        self,
        settings: ModerationSettings,
        prompt_embeddings: Mapping[str, Sequence[float]],
        scale: float,
        head: LinearHead | None = None,
    ) -> None:
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"the logit scale must be a positive number, got {scale}.")
        missing = [p for p in prompt_texts(settings) if p not in prompt_embeddings]
        if missing:
            raise ValueError(f"no embedding for prompts {missing}.")
        self.scale = scale
        self.head = head
        units = {p: _unit(prompt_embeddings[p], f"prompt {p!r}") for p in prompt_texts(settings)}
        dims = {v.shape[0] for v in units.values()}
        if len(dims) != 1:
            raise ValueError(f"prompt embeddings differ in dimension: {sorted(dims)}.")
        self.dim = dims.pop()
        if head is not None and head.dim != self.dim:
            raise ValueError(f"the head has dim {head.dim}; the prompt embeddings {self.dim}.")
        self.neutral = np.stack([units[p] for p in settings.neutral_prompts])
        head_names = set(head.names) if head is not None else set()
        self.zero_shot: dict[str, Vector] = {
            name: np.stack([units[p] for p in cat.prompts])
            for name, cat in settings.categories.items()
            if cat is not None and name not in head_names
        }
        self.thresholds: dict[str, float] = {}
        for name in CATEGORIES:
            own = head.thresholds.get(name) if head is not None else None
            cat = settings.categories.get(name)
            if own is not None:
                self.thresholds[name] = own
            elif cat is not None:
                self.thresholds[name] = cat.threshold
            elif name in head_names:
                self.thresholds[name] = DEFAULT_HEAD_THRESHOLD

    @property
    def scored(self) -> frozenset[str]:
        """The categories this scorer scores (configured or covered by the head)."""
        return frozenset(self.thresholds)

    def score_vector(self, vector: Sequence[float] | Vector, kind: InputKind) -> dict[str, float]:
        """Scores of one part's embedding, for the categories that apply to its kind."""
        x = _unit(vector, f"{kind} embedding")
        if x.shape[0] != self.dim:
            raise ValueError(f"{kind} embedding has {x.shape[0]} dimensions; expected "
                             f"{self.dim}.")
        applies = [c for c in CATEGORIES
                   if c in self.thresholds and (kind == "text" or c in IMAGE_CATEGORIES)]
        head = self.head.scores(x) if self.head is not None else {}
        return {
            c: head[c] if c in head
            else zero_shot_score(x, self.zero_shot[c], self.neutral, self.scale)
            for c in applies
        }

    def moderate(
        self, parts: Sequence[tuple[InputKind, Sequence[float] | Vector]]
    ) -> ModerationResult:
        """One result from an input's parts: per category the max over the parts scored for
        it, and the input types of those parts."""
        if not parts:
            raise ValueError("an input has at least one part.")
        best: dict[str, float] = {}
        kinds: dict[str, set[InputKind]] = {c: set() for c in CATEGORIES}
        for kind, vector in parts:
            for c, s in self.score_vector(vector, kind).items():
                best[c] = max(best.get(c, 0.0), s)
                kinds[c].add(kind)
        flags = {c: c in best and best[c] >= self.thresholds[c] for c in CATEGORIES}
        return ModerationResult(
            flagged=any(flags.values()),
            categories=flags,
            category_scores={c: best.get(c, 0.0) for c in CATEGORIES},
            category_applied_input_types={
                c: [k for k in INPUT_KINDS if k in kinds[c]] for c in CATEGORIES
            },
        )


def moderation_response(
    results: Sequence[ModerationResult], model: str, id: str
) -> dict[str, Any]:
    """OpenAI's ModerationCreateResponse: one result per input, all 13 categories in each."""
    return {"id": id, "model": model, "results": [r.to_dict() for r in results]}

