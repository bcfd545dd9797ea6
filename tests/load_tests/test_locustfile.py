"""The Locust file, run as a user runs it (headless, against the running app): each chat
sample is timed to the end of its stream, so it is never shorter than its time to first
token (Locust's own clock stops at the headers, which a stream sends at once)."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.support import API_KEYS, ROOT


def run_locust(iris: str, prefix: Path, seconds: int, *extra: str) -> tuple[dict, str]:
    """Locust headless against `iris`; its stats rows by (type, name), and its output."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("IRIS_")}
    # A small pool of never-seen images: what the test needs, made in seconds.
    env.update(LOCUST_API_KEY=API_KEYS[0], PYTHONPATH=str(ROOT), LOCUST_FRESH_POOL="2")
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "locust"), "-f", "load_tests/locustfile.py",
         "--host", iris.removesuffix("/v1"), "--headless", "-u", "2", "-r", "2",
         "-t", f"{seconds}s", "--csv", str(prefix), "--only-summary", *extra],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240, check=False,
    )
    with open(f"{prefix}_stats.csv") as f:
        rows = {(r["Type"], r["Name"]): r for r in csv.DictReader(f)}
    return rows, proc.stdout + proc.stderr


@pytest.mark.timeout(300)
def test_chat_samples_cover_the_whole_stream(iris_apps: Any, tmp_path: Path) -> None:
    iris = iris_apps["local"].base  # a client-side measurement: one layout is enough
    rows, output = run_locust(iris, tmp_path / "run", 20)
    pairs = [(rows[("POST", name)], rows[("TTFT", name)])
             for kind, name in rows if kind == "TTFT" and ("POST", name) in rows]
    assert pairs, output
    for post, ttft in pairs:
        assert int(post["Failure Count"]) == 0, post
        # Per name: the mean whole-stream time is at least the mean time to first token.
        assert float(post["Average Response Time"]) >= float(ttft["Average Response Time"])


@pytest.mark.timeout(300)
def test_conversations_resend_their_history_turn_after_turn(iris_apps: Any,
                                                            tmp_path: Path) -> None:
    """`--tags chat`: only conversations, each turn its own sample, none failing (a turn whose
    re-sent history the server refused would fail, and end its conversation)."""
    # Locust's run time counts its start (making the conversations' images) and a first turn
    # (a new 1280x960 image) takes seconds on a busy machine: 12 s once left none.
    rows, output = run_locust(iris_apps["local"].base, tmp_path / "chat", 40, "--tags", "chat")
    # The same-image tasks are out, so their images (seconds for 12 MP) are not made.
    assert "cache-friendly images: 0" in output, output
    posts = {name: r for (kind, name), r in rows.items() if kind == "POST"}
    assert {"chat-4turns turn 1", "chat-4turns turn 2"} <= set(posts), output
    assert all(n.startswith("chat-4turns turn ") for n in posts), sorted(posts)
    assert all(int(r["Failure Count"]) == 0 for r in posts.values()), posts
    # Later turns follow earlier ones: never more of turn N+1 than of turn N.
    counts = [int(posts[f"chat-4turns turn {t}"]["Request Count"])
              for t in range(1, 5) if f"chat-4turns turn {t}" in posts]
    assert counts == sorted(counts, reverse=True), counts
