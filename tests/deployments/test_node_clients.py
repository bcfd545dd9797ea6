"""Node clients beyond the openai npm package: the Vercel AI SDK (tests/node/ai_sdk.mjs),
unmodified, through its three routes to Iris: `openai(model)` (the Responses API),
`openai.chat(model)` (chat completions) and `@ai-sdk/openai-compatible` (chat completions, with
s3:// URLs passed through)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from tests.images import data_uri, encode, pattern
from tests.servers import ImageServer, S3Server
from tests.support import API_KEY, MODEL

NODE_DIR = Path(__file__).resolve().parent.parent / "node"
SDK_PACKAGES = ("ai", "@ai-sdk/openai", "@ai-sdk/openai-compatible")
MAX_OUTPUT_TOKENS = 6  # what ai_sdk.mjs asks for

# Every case that reaches Iris, and the request kind it makes.
GENERATE = (
    "responses_generate_data",
    "responses_generate_http",
    "chat_generate_data",
    "chat_generate_http",
    "compat_generate_s3",
    "compat_generate_http",
)
STREAM = (
    "responses_stream_data",
    "responses_stream_http",
    "chat_stream_data",
    "chat_stream_http",
    "compat_stream_s3",
    "compat_stream_data",
)


def run_node(script: str, env: dict[str, str]) -> dict[str, Any]:
    node = shutil.which("node")
    missing = [p for p in SDK_PACKAGES if not (NODE_DIR / "node_modules" / p).exists()]
    assert node is not None and not missing, (
        f"node and tests/node/node_modules ({missing}) are needed: run `make setup`"
    )
    proc = subprocess.run(
        [node, str(NODE_DIR / script)],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 0 and lines, (
        f"{script} exited {proc.returncode}\nstdout: {proc.stdout[-2000:]}\n"
        f"stderr: {proc.stderr[-6000:]}"
    )
    return json.loads(lines[-1])


def test_vercel_ai_sdk(iris: str, s3: S3Server, image_server: ImageServer) -> None:
    # Big enough that its image tokens stand out from the text's (~32 tokens), small enough that
    # its data URI (~76 kB) fits in one environment variable (Linux caps each at 128 kB).
    png = encode(pattern(192, 128, seed=31))
    env = {
        "IRIS_BASE_URL": iris,
        "IRIS_API_KEY": API_KEY,
        "IRIS_MODEL": MODEL,
        "IRIS_IMAGE_DATA": data_uri(png),
        "IRIS_IMAGE_HTTP": image_server.add_bytes("/ai-sdk.png", png),
        "IRIS_IMAGE_S3": s3.put("iris-test-images", "ai-sdk.png", png),
    }
    out = run_node("ai_sdk.mjs", env)

    text_only = out["text_only"]["input_tokens"]  # the same prompt without its image
    assert text_only > 0
    for case in GENERATE + STREAM:
        result = out[case]
        assert result["ok"] is True, (case, result)
        assert result["finish_reason"] in ("length", "stop"), (case, result)
        # The image reached the model: it costs prompt tokens, the same whatever carried it.
        assert result["input_tokens"] > max(30, text_only + 10), (case, result, text_only)
        assert 1 <= result["output_tokens"] <= MAX_OUTPUT_TOKENS, (case, result)
    for case in STREAM:
        # Every character Iris streamed reached the app as text deltas (a random model may stop
        # at once, so an empty answer is allowed; text lost between Iris and the SDK is not).
        result = out[case]
        assert result["text"] == result["sent_text"], (case, result)
        assert result["text_deltas"] >= (1 if result["sent_text"] else 0), (case, result)
    assert len({out[c]["input_tokens"] for c in GENERATE + STREAM}) == 1, out
    # Without includeUsage the SDK asks for no usage; the stream still ends cleanly.
    assert out["compat_default_stream_data"]["ok"] is True

    # What went out: URLs as URLs (Iris fetched them), data URIs as data URIs.
    http, s3_url = env["IRIS_IMAGE_HTTP"], env["IRIS_IMAGE_S3"]
    assert out["responses_generate_http"]["sent"] == {"type": "input_image", "url": http}
    assert out["responses_stream_data"]["sent"]["type"] == "input_image"
    assert out["responses_generate_data"]["sent"]["url"].startswith("data:image/png;base64,")
    assert out["chat_generate_http"]["sent"] == {"type": "image_url", "url": http}
    assert out["compat_generate_http"]["sent"] == {"type": "image_url", "url": http}
    assert out["compat_generate_s3"]["sent"] == {"type": "image_url", "url": s3_url}
    assert out["compat_stream_s3"]["sent"] == {"type": "image_url", "url": s3_url}
    assert image_server.hits["/ai-sdk.png"] >= 1

    # The SDK itself (no request made): @ai-sdk/openai won't pass s3:// on, and without
    # supportedUrls the compatible provider downloads URLs itself and refuses loopback hosts.
    assert out["openai_s3_client_side"]["refused"] is True
    assert "s3:" in out["openai_s3_client_side"]["error"]
    assert out["compat_default_http_client_side"]["refused"] is True
