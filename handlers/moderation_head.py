"""The optional linear head for /v1/moderations (`moderation.head`): a JSON file of
per-category logistic regressions trained on the encoder's L2-normalised embeddings, read and
checked once at start. Categories it covers are scored sigmoid(w_c . x + b_c) instead of
zero-shot.

File format: {dim, categories: {name: {weight, bias, threshold?}}}, `dim` the encoder's
embedding dimension and each `weight` that long.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError

from handlers.moderation import CATEGORIES
from handlers.protocol import validation_message

Vector = npt.NDArray[np.float64]


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
