"""What an engine answers, as it travels from the engine to the ingress: a whole JSON answer,
or the chunks of a streamed one. Errors never travel as events: they are raised (IrisError),
and a remote call re-raises them in the caller."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class JsonAnswer:
    """A whole answer (a non-streamed request): the last and only event."""

    body: dict[str, Any]


@dataclass(frozen=True, slots=True)
class SseChunk:
    """One or more server-sent-event frames of a streamed answer, exactly as sent."""

    text: str


EngineEvent = JsonAnswer | SseChunk
# Closing the stream (aclose) stops the engine request behind it.
EventStream = AsyncGenerator[EngineEvent, None]
