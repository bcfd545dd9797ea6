"""Other real clients: the openai npm package under Node, and langchain-openai."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.support import API_KEY, MODEL, SMALL_PNG, served_models

NODE_DIR = Path(__file__).resolve().parent.parent / "node"


def test_openai_npm_client(iris: str, iris_config: Any) -> None:
    node = shutil.which("node")
    if node is None or not (NODE_DIR / "node_modules" / "openai").exists():
        pytest.fail("node and tests/node/node_modules are needed: run `make setup`")
    env = {**os.environ, "IRIS_BASE_URL": iris, "IRIS_API_KEY": API_KEY,
           "IRIS_IMAGE_URL": SMALL_PNG}
    proc = subprocess.run([node, str(NODE_DIR / "contract.mjs")], env=env, capture_output=True,
                          text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["errors"] == "ok" and result["stream_chunks"] >= 2
    assert result["models"] == served_models(iris_config)


def test_langchain_chat_openai_with_image(iris: str) -> None:
    from langchain_core.messages import HumanMessage
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model=MODEL, base_url=iris, api_key=API_KEY, max_tokens=3,
                     temperature=0, max_retries=0)
    msg = HumanMessage(content=[
        {"type": "text", "text": "What is in this image?"},
        {"type": "image_url", "image_url": {"url": SMALL_PNG}},
    ])
    reply = llm.invoke([msg])
    assert 1 <= reply.response_metadata["token_usage"]["completion_tokens"] <= 3
    assert reply.usage_metadata and reply.usage_metadata["input_tokens"] > 20
    chunks = list(llm.stream([msg]))
    assert chunks
