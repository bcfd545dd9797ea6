"""The production layout's ImageAffinityRouter on two engine replicas: every turn of a
conversation (the history, first image included, re-sent each turn) lands on the same
engine, and so does every request with the same prompt_cache_key. Seen from the engines'
own counters."""

from __future__ import annotations

import uuid
from typing import Any

from tests.images import data_uri, encode, natural
from tests.support import MODEL, IrisApp, engine_stats, post_chat


def queries_by_replica(app: IrisApp) -> dict[int, int]:
    """Prefix-cache token queries so far, per engine (by its core's pid)."""
    return {s["engine_pids"][0]: int(s["prefix_cache_queries"])
            for s in engine_stats(app.config.app_name, app.engine_deployment)}


def grown(before: dict[int, int], after: dict[int, int]) -> set[int]:
    return {pid for pid, n in after.items() if n > before.get(pid, 0)}


def converse(base: str, image: str, turns: int, **extra: Any) -> None:
    history: list[dict[str, Any]] = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": image}},
        {"type": "text", "text": "What is in this picture?"}]}]
    for turn in range(turns):
        resp = post_chat(base, {"model": MODEL, "messages": history, "max_tokens": 4,
                                "temperature": 0, **extra})
        assert resp.status_code == 200, resp.text
        history += [{"role": "assistant", "content": resp.json()["choices"][0]["message"][
            "content"] or "ok"}, {"role": "user", "content": f"And then? ({turn})"}]


def test_a_conversation_stays_on_one_engine(iris_apps: dict[str, IrisApp]) -> None:
    app = iris_apps["split"]
    assert len(queries_by_replica(app)) == 2
    for seed in range(3):  # three conversations, each with its own image
        image = data_uri(encode(natural(256, 192, seed=4000 + seed), "JPEG"), "image/jpeg")
        before = queries_by_replica(app)
        converse(app.base, image, turns=4)
        assert len(grown(before, queries_by_replica(app))) == 1


def test_the_same_prompt_cache_key_reaches_the_same_engine(
    iris_apps: dict[str, IrisApp],
) -> None:
    app = iris_apps["split"]
    key = f"user-{uuid.uuid4().hex}"
    before = queries_by_replica(app)
    for seed in range(3):  # different images, one key: the key wins
        image = data_uri(encode(natural(200, 150, seed=5000 + seed), "JPEG"), "image/jpeg")
        converse(app.base, image, turns=1, prompt_cache_key=key)
    assert len(grown(before, queries_by_replica(app))) == 1
