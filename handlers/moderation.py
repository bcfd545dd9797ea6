"""/v1/moderations' vocabulary and settings: OpenAI's 13 categories (and which of them apply to
images), the input kinds, the default zero-shot prompts and thresholds, and
`ModerationSettings`, the `moderation` section of the Iris configuration.

Kept free of request parsing, the head file and scoring (and of every other handlers module):
handlers/config.py imports the settings from here, and the request, head and scoring modules
take these names from here too, so none of them can form an import cycle through the config.

The default prompts and thresholds are uncalibrated starting points: measure them against
labelled data for the encoder you serve (or train a linear head) before trusting them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

InputKind = Literal["text", "image"]

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
