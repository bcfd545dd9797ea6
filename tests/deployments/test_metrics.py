"""Prometheus metrics reach Ray's metrics endpoint with the stages a request went through."""

from __future__ import annotations

import re
import time
from typing import Any

import httpx

from tests.images import data_uri, encode, pattern
from tests.support import assert_envelope, good_body, image_msg, post_chat


def scrape(port: int) -> str:
    return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text


def stage_count(text: str, stage: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith("ray_iris_stage_seconds_count{") and f'stage="{stage}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_stage_latency_errors_and_cache_metrics(iris: str, iris_config: Any) -> None:
    port = iris_config.metrics_port  # the node's Prometheus endpoint, fixed by config
    before = scrape(port)
    # Never-seen images: a repeat would be served from the ingress's prepared-pixel refs
    # and skip the fetch and preprocess stages.
    for seed in range(3):
        img = data_uri(encode(pattern(64, 48, seed=1000 + seed + time.time_ns() % 10**6)))
        assert post_chat(iris, good_body(messages=image_msg(img))).status_code == 200
    assert_envelope(post_chat(iris, good_body(model="nope")), 404)
    want = ["fetch", "preprocess", "images", "queue", "e2e"]
    deadline = time.monotonic() + 60  # Ray's agents export every few seconds
    while time.monotonic() < deadline:
        text = scrape(port)
        if all(stage_count(text, s) >= stage_count(before, s) + 3 for s in want) and \
                re.search(r'ray_iris_errors_total\{[^}]*status="404"', text):
            break
        time.sleep(2)
    else:
        raise AssertionError("metrics did not show up:\n" + "\n".join(
            ln for ln in text.splitlines() if "iris_" in ln)[:3000])
    assert re.search(r'ray_iris_fetched_bytes_total\{[^}]*scheme="data"', text)
    assert re.search(r'ray_iris_pixels_total\{[^}]*direction="out"', text)
    assert "ray_iris_images_per_request_bucket" in text
