"""Helpers every test module may use: the test app's settings, request builders, and the
client-side checks of Iris's contract. (Test doubles live in tests/fakes.py, loopback servers
in tests/servers.py, images in tests/images.py; test modules import from none but these.)"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import openai

from tests.images import data_uri, encode, pattern

ROOT = Path(__file__).resolve().parent.parent
MODEL_DIR = ROOT / ".models" / "demo-vlm"
MODEL = "demo-vlm"
CLIP_DIR = ROOT / ".models" / "demo-clip"
ENCODER = "demo-clip"  # the local layout also serves this encoder (embeddings, moderations)


def served_models(config: Any) -> list[str]:
    """What /v1/models lists for an app with this IrisConfig: the chat model, then the encoder."""
    return [config.model.id, *([config.encoder.id] if config.encoder else [])]
# vLLM on CPU: a small, fixed KV cache so several engines fit in this machine's RAM.
ENGINE_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}
API_KEYS = ["iris-test-key", "iris-second-key"]
API_KEY = API_KEYS[0]
AUTH = {"Authorization": f"Bearer {API_KEY}"}
# Small engine queue so the backpressure test can overflow it quickly.
LLM_MAX_ONGOING = 4
LLM_MAX_QUEUED = 4
MAX_BODY_BYTES = 8 << 20
# Anything that looks like internals in a message a client sees.
LEAK = re.compile(r"0x[0-9a-f]{6,}|Traceback|/work/|/usr/|site-packages|\.py\b", re.I)
SMALL_PNG = data_uri(encode(pattern(64, 48, seed=9)))


@dataclass(frozen=True)
class IrisApp:
    layout: str
    config: Any  # IrisConfig
    base: str  # .../v1, where clients of this layout connect
    proxy_base: str  # the same app through Serve's proxy

    @property
    def engine_deployment(self) -> str:
        return "ChatIngress" if self.config.deployments.engine_in_ingress else "LLMServer"


def root(base: str) -> str:
    return base.removesuffix("/v1")


def image_msg(*urls: str, text: str = "Describe the image.") -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    parts.append({"type": "text", "text": text})
    return [{"role": "user", "content": parts}]


def good_body(**kw: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1,
            **kw}


def post_chat(base: str, body: Any, headers: dict[str, str] | None = None,
              raw: bytes | None = None, path: str = "/chat/completions") -> httpx.Response:
    h = {**AUTH, "Content-Type": "application/json", **(headers or {})}
    content = raw if raw is not None else json.dumps(body).encode()
    return httpx.post(f"{base}{path}", content=content, headers=h, timeout=120)


def assert_envelope(resp: httpx.Response, status: int) -> dict[str, Any]:
    """The response is an error in OpenAI's envelope with this status, leaking nothing."""
    assert resp.status_code == status, resp.text
    err: dict[str, Any] = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"] and not LEAK.search(err["message"]), err["message"]
    return err


def assert_still_serving(base: str) -> None:
    resp = post_chat(base, good_body())
    assert resp.status_code == 200, resp.text


def client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base, api_key=API_KEY, max_retries=0, timeout=300)


def top_logprobs(resp: Any) -> list[list[tuple[str, float]]]:
    return [
        [(t.token, t.logprob) for t in tok.top_logprobs] for tok in resp.choices[0].logprobs.content
    ]


def greedy(c: openai.OpenAI, messages: list[dict[str, Any]], **kw: Any) -> Any:
    return c.chat.completions.create(
        model=MODEL, messages=messages, temperature=0, max_tokens=3, logprobs=True,
        top_logprobs=5, **kw,
    )


def load_generator() -> ModuleType:
    """scripts/gen_infra.py (scripts/ is not a package), loaded as `python scripts/...` does."""
    spec = importlib.util.spec_from_file_location("gen_infra", ROOT / "scripts" / "gen_infra.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("gen_infra", module)
    spec.loader.exec_module(module)
    return module


def replica_actors(app_name: str, deployment: str) -> list[Any]:
    """The live replica actors of a deployment (Serve names them after both)."""
    import ray

    prefix = f"SERVE_REPLICA::{app_name}#{deployment}#"
    return [ray.get_actor(a["name"], namespace="serve")
            for a in ray.util.list_named_actors(all_namespaces=True)
            if a["namespace"] == "serve" and a["name"].startswith(prefix)]


def engine_stats(app_name: str, engine_deployment: str) -> list[dict[str, Any]]:
    """Every engine's stats (load, cache counters, pids) in an app, one per replica that holds
    an engine. Read from each replica directly (its routing stats), not through a handle,
    which would ask one replica at random."""
    import ray

    return [ray.get(actor.record_routing_stats.remote(), timeout=30)
            for actor in replica_actors(app_name, engine_deployment)]


def engine_unfinished(app_name: str, engine_deployment: str) -> int:
    return sum(int(s["unfinished_requests"]) for s in engine_stats(app_name, engine_deployment))


# A linear moderation head over the demo encoder's 64-d embeddings for one text category,
# so the session app exercises the head path next to zero-shot scoring.
HEAD_CATEGORY = "illicit"
HEAD_WEIGHT = [4.0] + [0.0] * 63
HEAD_BIAS = -0.5


def write_moderation_head(path: Path) -> Path:
    path.write_text(json.dumps({"dim": 64, "categories": {
        HEAD_CATEGORY: {"weight": HEAD_WEIGHT, "bias": HEAD_BIAS}}}))
    return path
