"""A bounded, concurrent streaming-chat workload against any OpenAI-compatible server,
recording time to first token and end-to-end latency per request.

Three shapes of workload:
- the same image(s) on every request (`image_urls`, cycled): cache-friendly;
- a distinct photo-like JPEG on every request (`size`): what a server sees from real users,
  nothing to reuse;
- conversations (`turns` > 1): the first user message holds an image, every turn re-sends the
  whole history with the assistant's actual answers, as chat clients do.

Everything a workload sends is made before its clock starts (`make_plan`): image generation
and JSON encoding are the client's CPU, on the same cores as the server under test.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import secrets
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np
from PIL import Image

from tests.images import encode, natural

# What the user asks at each turn of a conversation (the first goes with the image).
QUESTIONS = (
    "Describe this image.",
    "What colours stand out the most?",
    "Is there anything unusual in the top left corner?",
    "Sum up our conversation in one sentence.",
)


@dataclass(frozen=True)
class Workload:
    name: str
    image_urls: tuple[str, ...] = ()  # cycled through; one entry = the same image every request
    concurrency: int = 4
    requests: int = 40  # with turns > 1: turns, rounded up to whole conversations
    max_tokens: int = 8
    # (width, height): instead of image_urls, a distinct JPEG of this size for every request
    # (with turns > 1: for every conversation), made by the run's `Images`.
    size: tuple[int, int] | None = None
    turns: int = 1
    note: str = ""  # shown after the name in reports, e.g. "cache-friendly"
    # "chat": streamed chat completions; "embeddings": one image per /v1/embeddings request.
    route: str = "chat"

    def __post_init__(self) -> None:
        if bool(self.image_urls) == (self.size is not None):
            raise ValueError(f"{self.name}: give image_urls or size, not both or neither")
        if self.turns < 1:
            raise ValueError(f"{self.name}: turns must be >= 1")
        if self.route not in ("chat", "embeddings"):
            raise ValueError(f"{self.name}: route is chat or embeddings, not {self.route!r}")
        if self.route == "embeddings" and self.turns > 1:
            raise ValueError(f"{self.name}: embeddings have no turns")

    @property
    def label(self) -> str:
        return f"{self.name} ({self.note})" if self.note else self.name


class Images:
    """Distinct photo-like JPEGs, cheaply. `natural()` takes seconds at 12 MP, so a few bases
    per size are made once (on first use) and every image is derived from one: rolled by a
    seeded offset (every pixel moves), mirrored or not, and a seeded patch of noise added.
    Each image is then its own pixels, bytes and content hash, and no server can reuse any
    work from another. One object per run: its counter makes every image of the run distinct
    (warm-ups, servers, rounds), its random salt every run's."""

    def __init__(self, salt: int | None = None, bases: int = 2, quality: int = 90,
                 patch: int = 64) -> None:
        self.salt = secrets.randbits(32) if salt is None else salt
        self.bases = bases
        self.quality = quality
        self.patch = patch
        self.made = 0
        self.seconds = 0.0  # spent making images, bases included
        self._bases: dict[tuple[int, int], list[np.ndarray]] = {}

    def _base(self, width: int, height: int, n: int) -> np.ndarray:
        key = (width, height)
        if key not in self._bases:
            self._bases[key] = [
                np.asarray(natural(width, height, seed=(self.salt + 7919 * k) % 2**32))
                for k in range(self.bases)]
        found = self._bases[key]
        return found[n % len(found)]

    def image(self, width: int, height: int) -> Image.Image:
        t0 = time.perf_counter()
        n = self.made
        self.made += 1
        base = self._base(width, height, n)
        rng = np.random.default_rng([self.salt, n])
        arr = np.roll(base, (int(rng.integers(height)), int(rng.integers(width))), axis=(0, 1))
        if rng.integers(2):
            arr = arr[:, ::-1]
        ph, pw = min(self.patch, height), min(self.patch, width)
        y, x = int(rng.integers(height - ph + 1)), int(rng.integers(width - pw + 1))
        block = arr[y:y + ph, x:x + pw].astype(np.int16)
        noise = rng.integers(-24, 25, block.shape, dtype=np.int16)
        arr[y:y + ph, x:x + pw] = np.clip(block + noise, 0, 255).astype(np.uint8)
        img = Image.fromarray(np.ascontiguousarray(arr), "RGB")
        self.seconds += time.perf_counter() - t0
        return img

    def jpeg(self, width: int, height: int) -> bytes:
        img = self.image(width, height)
        t0 = time.perf_counter()
        data = encode(img, "JPEG", quality=self.quality)
        self.seconds += time.perf_counter() - t0
        return data

    def data_uri(self, width: int, height: int) -> str:
        data = self.jpeg(width, height)
        t0 = time.perf_counter()
        uri = f"data:image/jpeg;base64,{base64.b64encode(data).decode()}"
        self.seconds += time.perf_counter() - t0
        return uri


@dataclass
class Result:
    workload: str
    target: str
    wall_s: float = 0.0
    ttft_s: list[float] = field(default_factory=list)
    e2e_s: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    # From each answer's usage: prompt tokens, and how many of them the server had cached
    # (usage.prompt_tokens_details.cached_tokens; `details` counts answers that gave it).
    prompt_tokens: int = 0
    cached_tokens: int = 0
    details: int = 0
    ttft_by_turn: dict[int, list[float]] = field(default_factory=dict)

    @property
    def ok(self) -> int:
        return len(self.e2e_s)

    @property
    def throughput(self) -> float:
        return self.ok / self.wall_s if self.wall_s else 0.0

    def pct(self, values: list[float], p: float) -> float:
        if not values:
            return float("nan")
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]

    def record(self, res: StreamResult, turn: int = 0) -> None:
        """One finished request (turn: its place in a conversation, from 1; 0 for none)."""
        if not res.ok:
            self.errors.append(f"turn {turn}: {res.error}" if turn else res.error)
            return
        assert res.e2e_s is not None
        ttft = res.first_token_s if res.first_token_s is not None else res.e2e_s
        self.e2e_s.append(res.e2e_s)
        self.ttft_s.append(ttft)
        if turn:
            self.ttft_by_turn.setdefault(turn, []).append(ttft)
        usage = res.usage or {}
        self.prompt_tokens += int(usage.get("prompt_tokens") or 0)
        details = usage.get("prompt_tokens_details")
        if isinstance(details, dict) and details.get("cached_tokens") is not None:
            self.details += 1
            self.cached_tokens += int(details["cached_tokens"])

    def summary(self) -> dict[str, Any]:
        out = {
            "workload": self.workload, "target": self.target, "requests": self.ok,
            "errors": len(self.errors), "req_per_s": round(self.throughput, 2),
            "ttft_p50_ms": round(self.pct(self.ttft_s, 50) * 1000, 1),
            "ttft_p99_ms": round(self.pct(self.ttft_s, 99) * 1000, 1),
            "e2e_p50_ms": round(self.pct(self.e2e_s, 50) * 1000, 1),
            "e2e_mean_ms": round(statistics.fmean(self.e2e_s) * 1000, 1) if self.e2e_s else None,
            "prompt_tokens": self.prompt_tokens,
            # None: the server did not say (vLLM without --enable-prompt-tokens-details).
            "cached_tokens": self.cached_tokens if self.details else None,
            "cached_tokens_pct": cached_pct(self.cached_tokens, self.prompt_tokens)
            if self.details else None,
        }
        if self.ttft_by_turn:
            out["ttft_p50_ms_by_turn"] = {
                t: round(self.pct(v, 50) * 1000, 1) for t, v in sorted(self.ttft_by_turn.items())}
        return out


def cached_pct(cached: float, total: float) -> float | None:
    return round(100 * cached / total, 1) if total else None


def chat_body(model: str, image_url: str, max_tokens: int) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": image_url}},
            {"type": "text", "text": "Describe this image."},
        ]}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        # Every server generates exactly max_tokens, whatever the random model says.
        "ignore_eos": True,
    }


@dataclass
class StreamResult:
    ok: bool
    first_chunk_s: float | None = None
    first_token_s: float | None = None
    e2e_s: float | None = None
    error: str = ""
    text: str = ""  # the answer (conversations re-send it)
    usage: dict[str, Any] | None = None  # with stream_options.include_usage


def encoded(body: dict[str, Any]) -> bytes:
    """The request body as sent. Encode once per distinct body: re-serialising a 9 MB data: URI
    costs the client ~21 ms per request, CPU it takes from the server under test."""
    return json.dumps(body).encode()


@dataclass(frozen=True)
class Conversation:
    """A chat whose first user message holds an image; turn k re-sends the whole history: that
    message, then each earlier answer followed by the question after it. The first message
    (with its data: URI) is encoded once, before the clock; a turn only encodes its text."""

    opening: bytes  # JSON of the first user message: the image and the first question
    questions: tuple[str, ...]  # the user's text at each turn (the first is in `opening`)
    options: bytes  # the body's other members, JSON without the braces

    @classmethod
    def start(cls, model: str, image_url: str, max_tokens: int,
              questions: Sequence[str] = QUESTIONS) -> Conversation:
        body = chat_body(model, image_url, max_tokens)
        (first,) = body.pop("messages")
        first["content"][1]["text"] = questions[0]
        return cls(json.dumps(first).encode(), tuple(questions), json.dumps(body)[1:-1].encode())

    @property
    def turns(self) -> int:
        return len(self.questions)

    def later(self, replies: Sequence[str]) -> list[dict[str, Any]]:
        """The messages after the first one, once `replies` have been given."""
        out: list[dict[str, Any]] = []
        for reply, question in zip(replies, self.questions[1:], strict=False):
            out += [{"role": "assistant", "content": reply},
                    {"role": "user", "content": question}]
        return out

    def body(self, replies: Sequence[str]) -> bytes:
        """The request for turn len(replies) + 1."""
        rest = b"".join(b", " + json.dumps(m).encode() for m in self.later(replies))
        return b'{"messages": [' + self.opening + rest + b"], " + self.options + b"}"


@dataclass
class Plan:
    """Everything one run of a workload sends, made before its clock starts."""
    bodies: list[bytes] = field(default_factory=list)  # single-turn: one per request
    conversations: list[Conversation] = field(default_factory=list)

    @property
    def requests(self) -> int:
        return len(self.bodies) + sum(c.turns for c in self.conversations)


def question_list(turns: int) -> tuple[str, ...]:
    return tuple(QUESTIONS[t] if t < len(QUESTIONS) else f"And then? ({t + 1})"
                 for t in range(turns))


def embed_body(model: str, image_url: str, messages: bool = False) -> dict[str, Any]:
    """One image to embed: as an `input` item (Iris, and OpenAI's shape), or as vLLM's own
    pooling server takes images, a chat-style `messages` list (`messages=True`)."""
    item = {"type": "image_url", "image_url": {"url": image_url}}
    if messages:
        return {"model": model, "messages": [{"role": "user", "content": [item]}]}
    return {"model": model, "input": [item]}


def make_plan(model: str, workload: Workload, images: Images | None = None,
              requests: int | None = None, messages: bool = False) -> Plan:
    """The bodies of `requests` (default: the workload's) requests of `workload`. A `size`
    workload takes a new image from `images` for each request (or conversation): give the
    run's one `Images`, so that no two plans share an image. `messages`: embeddings bodies in
    vLLM's pooling-server shape (see embed_body)."""
    n = workload.requests if requests is None else requests
    if workload.size is not None and images is None:
        images = Images()

    def url(i: int) -> str:
        if workload.size is not None:
            assert images is not None
            return images.data_uri(*workload.size)
        return workload.image_urls[i % len(workload.image_urls)]

    if workload.route == "embeddings":
        return Plan(bodies=[encoded(embed_body(model, url(i), messages)) for i in range(n)])
    if workload.turns > 1:
        questions = question_list(workload.turns)
        return Plan(conversations=[
            Conversation.start(model, url(i), workload.max_tokens, questions)
            for i in range(max(1, math.ceil(n / workload.turns)))])
    if workload.size is not None:
        return Plan(bodies=[encoded(chat_body(model, url(i), workload.max_tokens))
                            for i in range(n)])
    # The same few images: encode each once and send the same bytes again.
    once = {u: encoded(chat_body(model, u, workload.max_tokens))
            for u in dict.fromkeys(workload.image_urls)}
    return Plan(bodies=[once[url(i)] for i in range(n)])


DONE = "[DONE]"


def sse_chunk(line: str) -> dict[str, Any] | str | None:
    """One line of an OpenAI chat stream: its chunk, DONE at the end, None for anything else
    (blank lines, comments)."""
    if not line.startswith("data: "):
        return None
    data = line[len("data: "):]
    return DONE if data == DONE else json.loads(data)


def delta_text(chunk: dict[str, Any]) -> str:
    """The answer's text in a chunk ("" for none)."""
    choices = chunk.get("choices") or [{}]
    return (choices[0].get("delta") or {}).get("content") or ""


async def stream_chat(client: httpx.AsyncClient, url: str,
                      body: dict[str, Any] | bytes) -> StreamResult:
    """One streaming chat request; any non-200, error event or missing [DONE] fails it."""
    t0 = time.monotonic()
    res = StreamResult(ok=False)
    content = body if isinstance(body, bytes) else encoded(body)
    try:
        async with client.stream("POST", url, content=content,
                                 headers={"Content-Type": "application/json"}) as resp:
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")[:200]
                res.error = f"HTTP {resp.status_code}: {text}"
                return res
            done = False
            async for line in resp.aiter_lines():
                chunk = sse_chunk(line)
                if chunk == DONE:
                    done = True
                    break
                if not isinstance(chunk, dict):
                    continue
                if "error" in chunk:
                    res.error = f"stream error: {chunk['error'].get('message')}"
                    return res
                now = time.monotonic() - t0
                if res.first_chunk_s is None:
                    res.first_chunk_s = now
                if chunk.get("usage"):
                    res.usage = chunk["usage"]
                piece = delta_text(chunk)
                if piece:
                    res.text += piece
                    if res.first_token_s is None:
                        res.first_token_s = now
            if not done:
                res.error = "stream ended without [DONE]"
                return res
            res.ok = True
            res.e2e_s = time.monotonic() - t0
            return res
    except Exception as exc:
        res.error = f"{type(exc).__name__}: {exc}"[:300]
        return res


async def post_embedding(client: httpx.AsyncClient, url: str, body: bytes) -> StreamResult:
    """One /v1/embeddings request; its whole time counts as the first token's (nothing
    streams). Fails on a non-200 or an answer without a vector."""
    t0 = time.monotonic()
    res = StreamResult(ok=False)
    try:
        resp = await client.post(url, content=body, headers={"Content-Type": "application/json"})
        if resp.status_code != 200:
            res.error = f"HTTP {resp.status_code}: {resp.text[:200]}"
            return res
        answer = resp.json()
        if not (answer.get("data") or [{}])[0].get("embedding"):
            res.error = f"no embedding in {resp.text[:200]}"
            return res
        res.usage = answer.get("usage")
        res.e2e_s = res.first_token_s = time.monotonic() - t0
        res.ok = True
        return res
    except Exception as exc:
        res.error = f"{type(exc).__name__}: {exc}"[:300]
        return res


async def one_request(client: httpx.AsyncClient, url: str, body: dict[str, Any] | bytes,
                      result: Result) -> None:
    if url.endswith("/embeddings"):
        result.record(await post_embedding(client, url, body if isinstance(body, bytes)
                                           else encoded(body)))
        return
    result.record(await stream_chat(client, url, body))


async def converse(client: httpx.AsyncClient, url: str, conv: Conversation,
                   result: Result) -> None:
    """The turns of one conversation, one after another, each answer re-sent in the next;
    a failed turn ends the conversation."""
    replies: list[str] = []
    for turn in range(1, conv.turns + 1):
        res = await stream_chat(client, url, conv.body(replies))
        result.record(res, turn)
        if not res.ok:
            return
        replies.append(res.text)


async def run_workload(base_url: str, model: str, workload: Workload, target: str,
                       api_key: str | None = None, timeout_s: float = 600,
                       plan: Plan | None = None, images: Images | None = None) -> Result:
    """Run `plan` (default: made now from `workload` and `images`, before the clock)."""
    if plan is None:
        plan = make_plan(model, workload, images)
    result = Result(workload.name, target)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    sem = asyncio.Semaphore(workload.concurrency)
    url = f"{base_url}/{'embeddings' if workload.route == 'embeddings' else 'chat/completions'}"
    limits = httpx.Limits(max_connections=workload.concurrency * 2)
    async with httpx.AsyncClient(timeout=timeout_s, headers=headers, limits=limits) as client:

        async def single(body: bytes) -> None:
            async with sem:
                await one_request(client, url, body, result)

        async def conversation(conv: Conversation) -> None:
            # A conversation holds its slot for all its turns: c=4 is four at once.
            async with sem:
                await converse(client, url, conv, result)

        t0 = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(single(b) for b in plan.bodies),
                                              *(conversation(c) for c in plan.conversations)),
                               timeout_s)
        result.wall_s = time.perf_counter() - t0
    return result
