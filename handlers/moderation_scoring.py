"""Scoring for /v1/moderations and its response: `Scorer` turns each part's embedding into
the 13 category scores and flags, and `moderation_response` wraps the results in OpenAI's
ModerationCreateResponse.

For an input's L2-normalised embedding x and logit scale s (see `logit_scale`):

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
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from handlers.moderation import (
    CATEGORIES,
    IMAGE_CATEGORIES,
    INPUT_KINDS,
    InputKind,
    ModerationSettings,
)
from handlers.moderation_head import LinearHead, Vector

# A linear head's category with no threshold of its own, and none in the settings.
DEFAULT_HEAD_THRESHOLD = 0.5
# OpenAI CLIP's trained logit scale (exp of the stored parameter, clamped at 100 in training).
CLIP_LOGIT_SCALE = 100.0


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


def new_moderation_id() -> str:
    return f"modr-{uuid.uuid4().hex}"


def moderation_response(
    results: Sequence[ModerationResult], model: str, id: str
) -> dict[str, Any]:
    """OpenAI's ModerationCreateResponse: one result per input, all 13 categories in each."""
    return {"id": id, "model": model, "results": [r.to_dict() for r in results]}
