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


@pytest.mark.timeout(300)
def test_chat_samples_cover_the_whole_stream(iris_apps: Any, tmp_path: Path) -> None:
    iris = iris_apps["local"].base  # a client-side measurement: one layout is enough
    env = {k: v for k, v in os.environ.items() if not k.startswith("IRIS_")}
    env.update(LOCUST_API_KEY=API_KEYS[0], PYTHONPATH=str(ROOT))
    prefix = tmp_path / "run"
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "locust"), "-f", "load_tests/locustfile.py",
         "--host", iris.removesuffix("/v1"), "--headless", "-u", "2", "-r", "2", "-t", "20s",
         "--csv", str(prefix), "--only-summary"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240, check=False,
    )
    with open(f"{prefix}_stats.csv") as f:
        rows = {(r["Type"], r["Name"]): r for r in csv.DictReader(f)}
    pairs = [(rows[("POST", name)], rows[("TTFT", name)])
             for kind, name in rows if kind == "TTFT" and ("POST", name) in rows]
    assert pairs, (proc.stdout[-3000:], proc.stderr[-3000:])
    for post, ttft in pairs:
        assert int(post["Failure Count"]) == 0, post
        # Per name: the mean whole-stream time is at least the mean time to first token.
        assert float(post["Average Response Time"]) >= float(ttft["Average Response Time"])
