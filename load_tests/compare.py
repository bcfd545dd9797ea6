"""Side by side on one machine and one model: vLLM's own OpenAI server, Ray Serve LLM, Iris.

Starts each server in turn (never two at once), runs the same workloads against each, and
writes a Markdown table and PNG plots under the results folder.

    .venv/bin/python -m load_tests.compare [--targets vllm,vllm-pooling,rayllm,iris] [--requests 40]
        [--concurrency 4] [--max-tokens 8] [--iris-env IRIS_IMAGING__FIDELITY=fast]
        [--iris-variant proxy:IRIS_HTTP__DIRECT_INGRESS=false] [--rounds 3] [--interleave]
        [--workloads fresh-small,fresh-12mp,chat-4turns] [--cache-metrics chat-4turns]

Workloads (--workloads picks some, in this order; the realistic ones first):
  fresh-small      a distinct 640x480 photo-like JPEG on every request, c=--concurrency
  fresh-12mp       a distinct 4000x3000 JPEG on every request
  chat-4turns      conversations of 4 turns: the first user message holds a distinct 1280x960
                   JPEG, each turn re-sends the whole history (the streamed answers, then a
                   new question); c=4 is four conversations at once; requests count turns
  fresh-small-c1, fresh-12mp-c1   the same at c=1
  embed-fresh      a distinct 640x480 JPEG per /v1/embeddings request to the encoder
                   (demo-clip), against vLLM's own pooling server (target vllm-pooling)
  same-small, same-12mp, same-small-c1, same-12mp-c1   the same image on every request
                   (cache-friendly: what servers that cache images are best at)
Every distinct image is distinct in the whole run (warm-ups, servers and rounds included), and
every image and request body is made before the clock starts.

Caches: every answer's usage.prompt_tokens_details.cached_tokens (each server is started to
report it) gives cached/prompt tokens for every workload. For the workloads named by
--cache-metrics, vLLM's own counters (prefix cache: tokens queried and hit; multimodal cache:
items queried and hit) are read from each server's Prometheus page before and after the
measured requests: vLLM's /metrics, and for Ray Serve LLM and Iris, Ray's metrics agent.

A shared machine's speed drifts by tens of percent over minutes, and the servers run
minutes apart: --rounds N repeats the whole sequence N times, each round starting with a
different server, and reports each number's median over the rounds with the req/s range.
--interleave starts every server first and runs each workload on one after another, so
the servers are measured seconds apart; what the idle ones cost is reported.

The peers cannot read s3://, so every workload sends images as data: URIs.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx

from load_tests.cpu import CpuMeter
from load_tests.workload import Images, Result, Workload, cached_pct, make_plan, run_workload
from tests.images import data_uri, encode, natural
from tests.servers import free_port

ROOT = Path(__file__).resolve().parent.parent
MODEL_DIR = ROOT / ".models" / "demo-vlm"
MODEL_ID = "demo-vlm"
ENCODER_DIR = ROOT / ".models" / "demo-clip"
ENCODER_ID = "demo-clip"
ENGINE_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}
NO_STATS = ("engine statistics off (--no-engine-stats): the peer runs with "
            "--disable-log-stats, so its engine keeps no cache counters")


@dataclass
class Server:
    name: str
    command: list[str]
    port: int
    env: dict[str, str] = field(default_factory=dict)
    # Iris answers /v1/models before its engine has loaded; /ready waits for the engine.
    ready_path: str = "/v1/models"
    proc: subprocess.Popen[bytes] | None = None
    # The Prometheus page with the engine's vLLM counters; None: `no_metrics` says why.
    metrics_url: str | None = None
    no_metrics: str = ""
    # A line the server prints once it is ready: a 200 alone is not proof (compare-18 saw one
    # 4 s after an Iris start, from whatever answered on the port before Ray was even up).
    ready_line: bytes | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self, log: Path) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("IRIS_")}
        env.update(ENGINE_ENV)
        env.update(self.env)
        self._log = log.open("wb")
        self.proc = subprocess.Popen(self.command, cwd=ROOT, env=env, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout_s: float = 900) -> float:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout_s:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}")
            try:
                url = f"http://127.0.0.1:{self.port}{self.ready_path}"
                if httpx.get(url, timeout=5).status_code == 200 and self._said_ready():
                    return time.monotonic() - t0
            except httpx.HTTPError:
                pass
            time.sleep(2)
        raise TimeoutError(f"{self.name} was not ready after {timeout_s:.0f} s")

    def _said_ready(self) -> bool:
        return self.ready_line is None or self.ready_line in Path(self._log.name).read_bytes()

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        # SIGINT first: the Ray-based servers shut Serve and Ray down on it.
        for sig, wait in ((signal.SIGINT, 60), (signal.SIGTERM, 20), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.proc.pid, sig)
                self.proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
            except ProcessLookupError:
                break
        self._log.close()


def parse_variant(spec: str) -> tuple[str, dict[str, str]]:
    """'proxy:IRIS_HTTP__DIRECT_INGRESS=false,K=V' -> ('iris-proxy', {...})."""
    name, _, pairs = spec.partition(":")
    if not name or not pairs:
        raise ValueError(f"--iris-variant wants NAME:KEY=VALUE[,KEY=VALUE], not {spec!r}")
    return f"iris-{name}", dict(kv.split("=", 1) for kv in pairs.split(","))


def iris_server(name: str, env: dict[str, str], iris_env: dict[str, str], port: int) -> Server:
    """Iris as `make serve` runs it, with `env` on top of the run's IRIS_* settings. Its node's
    metrics agent (which exports the engine's vLLM counters) gets a port of its own: the
    default 8080 may be taken, by another Iris of the same run among others."""
    metrics = free_port()
    return Server(name, [sys.executable, "-m", "deployments.run"], port,
                  {"IRIS_HTTP__PORT": str(port), "IRIS_METRICS_PORT": str(metrics),
                   **iris_env, **env}, "/ready",
                  metrics_url=f"http://127.0.0.1:{metrics}/metrics", ready_line=b">> ready in ")


def vllm_server(port: int, engine_stats: bool = True) -> Server:
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model",
           str(MODEL_DIR), "--served-model-name", MODEL_ID, "--host", "127.0.0.1",
           "--port", str(port), "--max-model-len", "4096", "--dtype", "float32",
           "--enforce-eager", "--max-num-seqs", "16",
           # usage.prompt_tokens_details.cached_tokens, as Iris reports it.
           "--enable-prompt-tokens-details"]
    if not engine_stats:
        return Server("vllm", [*cmd, "--disable-log-stats"], port, no_metrics=NO_STATS)
    # With stats on, as Iris's engine always runs: its counters are on the API port.
    return Server("vllm", cmd, port, metrics_url=f"http://127.0.0.1:{port}/metrics")


def vllm_pooling_server(port: int) -> Server:
    """vLLM's own server on the encoder (pooling runner): the embeddings workloads' peer."""
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model",
           str(ENCODER_DIR), "--served-model-name", ENCODER_ID, "--runner", "pooling",
           "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
           "--enforce-eager", "--max-num-seqs", "16", "--kv-cache-memory-bytes", "67108864"]
    return Server("vllm-pooling", cmd, port, metrics_url=f"http://127.0.0.1:{port}/metrics")


def serves(target: str, w: Workload) -> bool:
    """Iris serves every workload; vLLM's chat server and Ray Serve LLM the chat ones; vLLM's
    pooling server the embeddings ones."""
    if target == "vllm-pooling":
        return w.route == "embeddings"
    if target in ("vllm", "rayllm"):
        return w.route == "chat"
    return True


def model_of(w: Workload) -> str:
    return ENCODER_ID if w.route == "embeddings" else MODEL_ID


def rayllm_server(port: int, engine_stats: bool = True) -> Server:
    cmd = [sys.executable, "-m", "load_tests.peers.rayllm_app", "--model", str(MODEL_DIR),
           "--model-id", MODEL_ID, "--port", str(port)]
    if not engine_stats:
        return Server("rayllm", [*cmd, "--no-engine-stats"], port, no_metrics=NO_STATS)
    metrics = free_port()
    return Server("rayllm", [*cmd, "--metrics-port", str(metrics)], port,
                  metrics_url=f"http://127.0.0.1:{metrics}/metrics")


def servers(targets: list[str], iris_env: dict[str, str],
            variants: dict[str, dict[str, str]] | None = None,
            engine_stats: bool = True) -> list[Server]:
    made: dict[str, Callable[[int], Server]] = {
        "vllm": functools.partial(vllm_server, engine_stats=engine_stats),
        "rayllm": functools.partial(rayllm_server, engine_stats=engine_stats),
        "vllm-pooling": vllm_pooling_server,
    }
    # Iris, and each variant of it: the same server with more settings on top.
    for name, env in {"iris": {}, **(variants or {})}.items():
        made[name] = functools.partial(iris_server, name, env, iris_env)
    return [made[t](free_port()) for t in targets]


SMALL, LARGE, CHAT = (640, 480), (4000, 3000), (1280, 960)
# In the order they run and are reported: distinct images and conversations first; the
# same-image ones (which a server with an image cache wins easily) last.
WORKLOADS = ("fresh-small", "fresh-12mp", "chat-4turns", "fresh-small-c1", "fresh-12mp-c1",
             "embed-fresh", "same-small", "same-12mp", "same-small-c1", "same-12mp-c1")
DESCRIPTIONS = {
    "fresh": "a distinct {w}x{h} photo-like JPEG (q90) on every request",
    "chat": "conversations of {turns} turns, the first user message holding a distinct {w}x{h} "
            "JPEG, each turn re-sending the whole history (the streamed answers and a new "
            "question); concurrency counts conversations, requests count turns",
    "same": "the same {w}x{h} JPEG (q90) on every request",
    "embed": "a distinct {w}x{h} photo-like JPEG (q90) per /v1/embeddings request, to the "
             "encoder (vLLM's pooling server takes it as chat-style `messages`)",
}


def check_names(names: Iterable[str]) -> set[str]:
    wanted = set(names)
    unknown = wanted - set(WORKLOADS)
    if unknown:
        raise ValueError(f"unknown workloads {sorted(unknown)}; known: {', '.join(WORKLOADS)}")
    return wanted


@functools.cache
def same_image(size: tuple[int, int]) -> str:
    """The one image of the same-image workloads (the images of earlier runs, so their
    numbers stay comparable). Made only if such a workload runs: 12 MP takes seconds."""
    seed = 1 if size == SMALL else 2
    return data_uri(encode(natural(*size, seed=seed), "JPEG", quality=90), "image/jpeg")


def workloads(requests: int, concurrency: int, max_tokens: int,
              names: Iterable[str] = WORKLOADS) -> list[Workload]:
    """The named workloads, in WORKLOADS' order. Distinct images are made per run of a
    workload (make_plan), not here."""
    wanted = check_names(names)
    c1 = max(10, requests // 4)
    out = []
    for name in (n for n in WORKLOADS if n in wanted):
        conc, n = (1, c1) if name.endswith("-c1") else (concurrency, requests)
        size = SMALL if "-small" in name else LARGE
        if name.startswith("embed"):
            out.append(Workload(name, concurrency=conc, requests=n, size=SMALL,
                                route="embeddings"))
        elif name.startswith("chat"):
            out.append(Workload(name, concurrency=conc, requests=n, max_tokens=max_tokens,
                                size=CHAT, turns=4))
        elif name.startswith("fresh"):
            out.append(Workload(name, concurrency=conc, requests=n, max_tokens=max_tokens,
                                size=size))
        else:
            out.append(Workload(name, (same_image(size),), conc, n, max_tokens,
                                note="cache-friendly"))
    return out


def describe(w: Workload) -> str:
    kind = w.name.split("-", 1)[0]
    size = w.size or (SMALL if "-small" in w.name else LARGE)
    what = DESCRIPTIONS[kind].format(w=size[0], h=size[1], turns=w.turns)
    return f"`{w.label}`: {what}; c={w.concurrency}, {w.requests} requests"


T = TypeVar("T")


def rotated(targets: list[T], round_: int) -> list[T]:
    """Round k starts with the k-th server, so none always runs first (or last)."""
    k = round_ % max(1, len(targets))
    return targets[k:] + targets[:k]


# vLLM's counters behind the cache figures (prefix cache in tokens, multimodal cache in
# items), and finished requests: how far a delayed exporter has got.
COUNTERS = ("prefix_cache_queries", "prefix_cache_hits", "mm_cache_queries", "mm_cache_hits",
            "request_success")


def engine_counters(text: str) -> dict[str, float] | None:
    """vLLM's COUNTERS in a Prometheus page, summed over their labels (engines, replicas,
    finish reasons), whether named as vLLM's server names them (vllm:prefix_cache_hits_total)
    or as Ray's metrics agent re-exports them (ray_vllm_prefix_cache_hits_total). None: the
    page has none of them."""
    out = dict.fromkeys(COUNTERS, 0.0)
    seen = False
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        if "{" in line:
            name, _, rest = line.partition("{")
            value = rest.rsplit("}", 1)[-1].split()[0]
        else:
            name, value = line.split()[:2]
        key = name.replace(":", "_").removeprefix("ray_")
        if not (key.startswith("vllm_") and key.endswith("_total")):
            continue
        key = key.removeprefix("vllm_").removesuffix("_total")
        if key in out:
            out[key] += float(value)
            seen = True
    return out if seen else None


def scrape(url: str) -> dict[str, float] | str:
    """The engine's counters, or why the page could not be read. Ray exports a counter only
    once it has counted something: absent ones are zero."""
    try:
        resp = httpx.get(url, timeout=10)
        resp.raise_for_status()
    except httpx.HTTPError as exc:
        return f"{url}: {type(exc).__name__}: {exc}"[:200]
    return engine_counters(resp.text) or dict.fromkeys(COUNTERS, 0.0)


def settle(url: str, base: dict[str, float], requests: int,
           timeout_s: float = 60) -> tuple[dict[str, float] | None, bool]:
    """The counters once the engine has counted `requests` more finished requests than in
    `base`: Ray's metrics agent exports every few seconds, so a scrape right after the last
    answer may miss the last ones. (counters, whether they got there in time)."""
    deadline = time.monotonic() + timeout_s
    found: dict[str, float] | None = None
    while True:
        page = scrape(url)
        found = page if isinstance(page, dict) else found
        if found and found["request_success"] >= base["request_success"] + requests:
            return found, True
        if time.monotonic() > deadline:
            return found, False
        time.sleep(0.5)


def cache_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    d = {k: after[k] - before[k] for k in COUNTERS}
    return {"prefix_cache_queries": d["prefix_cache_queries"],
            "prefix_cache_hits": d["prefix_cache_hits"],
            "prefix_cache_hit_pct": cached_pct(d["prefix_cache_hits"], d["prefix_cache_queries"]),
            "mm_cache_queries": d["mm_cache_queries"], "mm_cache_hits": d["mm_cache_hits"],
            "mm_cache_hit_pct": cached_pct(d["mm_cache_hits"], d["mm_cache_queries"]),
            "engine_requests": d["request_success"]}


ENGINE_FIGURES = ("prefix_cache_queries", "prefix_cache_hits", "prefix_cache_hit_pct",
                  "mm_cache_queries", "mm_cache_hits", "mm_cache_hit_pct", "engine_requests")


def cache_row(workload: str, target: str, round_: int) -> dict[str, Any]:
    """A workload's engine cache figures on one server, all null until read (`note`: why)."""
    return {"workload": workload, "target": target, "round": round_,
            **dict.fromkeys(ENGINE_FIGURES), "note": ""}


@dataclass
class Bench:
    """What every measurement of a run shares, and what they record."""
    images: Images
    warmup: int
    scrape: frozenset[str] = frozenset()  # workloads whose engine counters are read
    settle_s: float = 60
    results: list[Result] = field(default_factory=list)
    cpu: list[dict[str, Any]] = field(default_factory=list)
    caches: list[dict[str, Any]] = field(default_factory=list)
    generation_s: float = 0.0
    # CPU ms per second each server used with no traffic, once ready (run_in_turn).
    idle: dict[str, list[float]] = field(default_factory=dict)


MEDIANS = ("req_per_s", "ttft_p50_ms", "ttft_p99_ms", "e2e_p50_ms", "e2e_mean_ms")


def combined(results: list[Result], caches: list[dict[str, Any]] | None = None,
             ) -> dict[tuple[str, str], dict[str, Any]]:
    """Per (workload, target): each number's median over the rounds, errors and token counts
    summed, the range of req/s (one round: its own summary), and the engine's cache figures
    over all rounds that have them."""
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in results:
        runs.setdefault((r.workload, r.target), []).append(r.summary())
    out = {}
    for key, rs in runs.items():
        s = dict(rs[0])
        for k in MEDIANS:
            vals = [r[k] for r in rs if r.get(k) is not None]
            s[k] = round(statistics.median(vals), 2) if vals else None
        s["requests"] = sum(r["requests"] for r in rs)
        s["errors"] = sum(r["errors"] for r in rs)
        s["rounds"] = len(rs)
        s["req_per_s_range"] = [min(r["req_per_s"] for r in rs), max(r["req_per_s"] for r in rs)]
        s["prompt_tokens"] = sum(r["prompt_tokens"] for r in rs)
        told = [r for r in rs if r["cached_tokens"] is not None]
        s["cached_tokens"] = sum(r["cached_tokens"] for r in told) if told else None
        s["cached_tokens_pct"] = cached_pct(
            s["cached_tokens"], sum(r["prompt_tokens"] for r in told)) if told else None
        turns = [r["ttft_p50_ms_by_turn"] for r in rs if r.get("ttft_p50_ms_by_turn")]
        if turns:
            s["ttft_p50_ms_by_turn"] = {
                t: round(statistics.median(x[t] for x in turns if t in x), 1)
                for t in sorted({t for x in turns for t in x})}
        out[key] = s
    for key, rows in cache_rows(caches or []).items():
        if key in out:
            out[key].update(rows)
    return out


def cache_rows(caches: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """The engine's cache figures per (workload, target), summed over rounds."""
    by: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in caches:
        by.setdefault((row["workload"], row["target"]), []).append(row)
    out = {}
    for key, rows in by.items():
        got = [r for r in rows if r.get("prefix_cache_queries") is not None]
        if not got:
            out[key] = {**dict.fromkeys(ENGINE_FIGURES), "engine_note": rows[0]["note"]}
            continue
        sums = {k: sum(r[k] for r in got) for k in ("prefix_cache_queries", "prefix_cache_hits",
                                                     "mm_cache_queries", "mm_cache_hits",
                                                     "engine_requests")}
        notes = sorted({r["note"] for r in rows if r["note"]})
        out[key] = {**sums,
                    "prefix_cache_hit_pct": cached_pct(sums["prefix_cache_hits"],
                                                       sums["prefix_cache_queries"]),
                    "mm_cache_hit_pct": cached_pct(sums["mm_cache_hits"],
                                                   sums["mm_cache_queries"]),
                    "engine_note": "; ".join(notes)}
    return out


def pct_text(v: float | None) -> str:
    return "n/a" if v is None else f"{v}%"


def markdown(results: list[Result], targets: list[str], labels: dict[str, str] | None = None,
             caches: list[dict[str, Any]] | None = None) -> str:
    by = combined(results, caches)
    names = list(dict.fromkeys(r.workload for r in results))
    peers = {r.workload: "vllm-pooling" if r.workload.startswith("embed") else "vllm"
             for r in results}
    lines = ["| workload | " + " | ".join(targets) + " | iris / peer req/s |",
             "|---|" + "---|" * (len(targets) + 1)]
    for w in names:
        cells = []
        for t in targets:
            s = by.get((w, t))
            if s is None:
                cells.append("n/a")
                continue
            spread = " ({}-{})".format(*s["req_per_s_range"]) if s["rounds"] > 1 else ""
            cell = (f"{s['req_per_s']} req/s{spread}, TTFT p50 {s['ttft_p50_ms']} ms, "
                    f"p99 {s['ttft_p99_ms']} ms")
            if s.get("ttft_p50_ms_by_turn"):
                cell += (", TTFT p50 by turn "
                         + "/".join(str(v) for v in s["ttft_p50_ms_by_turn"].values()) + " ms")
            if "engine_note" in s:  # the workloads whose engine counters were read
                cell += (f", cached tokens {pct_text(s['cached_tokens_pct'])}, prefix-cache "
                         f"hits {pct_text(s['prefix_cache_hit_pct'])}, mm-cache hits "
                         f"{pct_text(s['mm_cache_hit_pct'])}")
            cells.append(cell + (f", {s['errors']} errors" if s["errors"] else ""))
        ratio, other = "", peers[w]
        if (w, "iris") in by and (w, other) in by and by[(w, other)]["req_per_s"]:
            ratio = f"{by[(w, 'iris')]['req_per_s'] / by[(w, other)]['req_per_s']:.2f}x"
        lines.append(f"| {(labels or {}).get(w, w)} | " + " | ".join(cells) + f" | {ratio} |")
    return "\n".join(lines) + "\n"


def caches_markdown(results: list[Result], caches: list[dict[str, Any]],
                    labels: dict[str, str] | None = None) -> str:
    """Cache figures by workload and server: the answers' cached tokens for every workload,
    the engine's counters where they were read."""
    by = combined(results, caches)
    lines = ["| workload | server | cached / prompt tokens (usage) | prefix cache: hit / queried "
             "tokens (engine) | mm cache: hit / queried items (engine) | note |",
             "|---|---|---|---|---|---|"]
    for (w, t), s in by.items():
        usage = ("not reported" if s["cached_tokens"] is None else
                 f"{s['cached_tokens']} / {s['prompt_tokens']} "
                 f"({pct_text(s['cached_tokens_pct'])})")
        prefix = mm = "not read"
        if "engine_note" in s:
            prefix = mm = "n/a"
            if s["prefix_cache_queries"] is not None:
                prefix = (f"{s['prefix_cache_hits']:.0f} / {s['prefix_cache_queries']:.0f} "
                          f"({pct_text(s['prefix_cache_hit_pct'])})")
                mm = (f"{s['mm_cache_hits']:.0f} / {s['mm_cache_queries']:.0f} "
                      f"({pct_text(s['mm_cache_hit_pct'])})")
        lines.append(f"| {(labels or {}).get(w, w)} | {t} | {usage} | {prefix} | {mm} | "
                     f"{s.get('engine_note', '')} |")
    return "\n".join(lines) + "\n"


def cpu_markdown(cpu: list[dict[str, Any]], labels: dict[str, str] | None = None) -> str:
    """Per-process CPU ms per request: where each server's time goes."""
    lines = ["| workload | server | total CPU ms/request | by process (ms/request) |",
             "|---|---|---|---|"]
    rounds = any(row.get("round", 1) > 1 for row in cpu)
    for row in cpu:
        top = ", ".join(f"{k} {v}" for k, v in list(row["cpu_ms"].items())[:7])
        server = f"{row['target']} (round {row['round']})" if rounds else row["target"]
        name = (labels or {}).get(row["workload"], row["workload"])
        lines.append(f"| {name} | {server} | "
                     f"{round(sum(row['cpu_ms'].values()), 1)} | {top} |")
    return "\n".join(lines) + "\n"


def plot(results: list[Result], targets: list[str], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r.workload for r in results))
    by = combined(results)
    files = []
    for metric, label in (("req_per_s", "throughput (req/s)"), ("ttft_p50_ms", "TTFT p50 (ms)"),
                          ("ttft_p99_ms", "TTFT p99 (ms)")):
        fig, ax = plt.subplots(figsize=(max(9, 1.2 * len(names)), 4))
        width = 0.8 / max(1, len(targets))
        for i, t in enumerate(targets):
            vals = [by.get((w, t), {}).get(metric, 0) or 0 for w in names]
            ax.bar([j + i * width for j in range(len(names))], vals, width, label=t)
        ax.set_xticks([j + width * (len(targets) - 1) / 2 for j in range(len(names))])
        ax.set_xticklabels(names, rotation=15, fontsize=8)
        ax.set_ylabel(label)
        ax.legend()
        fig.tight_layout()
        path = out / f"{metric}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        files.append(path)
    return files


def measure(bench: Bench, server: Server, loads: list[Workload], round_: int) -> None:
    """For each workload: make its images and bodies, warm up (on images of its own), then
    run it once against a ready server, with its CPU and, if asked, the engine's caches."""
    for w in (w for w in loads if serves(server.name, w)):
        t0 = time.perf_counter()
        model, messages = model_of(w), server.name == "vllm-pooling"
        warm_plan = (make_plan(model, w, bench.images, bench.warmup, messages)
                     if bench.warmup else None)
        plan = make_plan(model, w, bench.images, messages=messages)
        made = time.perf_counter() - t0
        bench.generation_s += made
        print(f">> [{server.name}] {w.name}: {plan.requests} requests "
              f"(+{warm_plan.requests if warm_plan else 0} warm-up) made in {made:.1f} s",
              flush=True)
        url = server.metrics_url if w.name in bench.scrape else None
        page = scrape(url) if url else (server.no_metrics or "no metrics page known")
        warm_ok = 0
        if warm_plan is not None:
            warm = asyncio.run(run_workload(server.base_url, model, w, server.name,
                                            plan=warm_plan))
            warm_ok = warm.ok
        del warm_plan
        before = None
        if url and isinstance(page, dict):
            before = settle(url, page, warm_ok, bench.settle_s)[0] if warm_ok else page
        assert server.proc is not None
        meter = CpuMeter(server.proc.pid)
        cpu_before = meter.snapshot()
        r = asyncio.run(run_workload(server.base_url, model, w, server.name, plan=plan))
        used = CpuMeter.per_request_ms(cpu_before, meter.snapshot(), plan.requests)
        del plan
        bench.results.append(r)
        bench.cpu.append({"workload": w.name, "target": server.name, "round": round_ + 1,
                          "cpu_ms": used})
        print(f">> [{server.name}] {json.dumps(r.summary())}", flush=True)
        print(f"   CPU ms/request: {json.dumps(dict(list(used.items())[:7]))}", flush=True)
        if w.name in bench.scrape:
            row = cache_row(w.name, server.name, round_ + 1)
            row["note"] = page if isinstance(page, str) else ""
            if url and before is not None:
                after, settled = settle(url, before, r.ok, bench.settle_s)
                if after is None or not any(after.values()):
                    row["note"] = f"no vLLM cache counters at {url} (engine statistics off?)"
                else:
                    row.update(cache_delta(before, after))
                    if not settled:
                        row["note"] = (
                            f"the engine had not counted all {r.ok} requests after "
                            f"{bench.settle_s:.0f} s (Ray's metrics agent exports every few "
                            "seconds): figures may be short")
            bench.caches.append(row)
            print(f"   caches: {json.dumps({k: v for k, v in row.items() if v is not None})}",
                  flush=True)
        for e in r.errors[:3]:
            print(f"   error: {e}", flush=True)


def run_in_turn(targets: list[str], make: Callable[[str], Server], loads: list[Workload],
                args: argparse.Namespace, out: Path, bench: Bench) -> None:
    """One server at a time: start it, run every workload, stop it; round after round."""
    plan = [(k, t) for k in range(args.rounds) for t in rotated(targets, k)]
    for k, server in ((k, make(t)) for k, t in plan):
        run_server(server, loads, k, args.rounds, out, bench)


def run_server(server: Server, loads: list[Workload], round_: int, rounds: int, out: Path,
               bench: Bench) -> None:
    """Start `server`, wait until it is ready and idle, run the workloads it serves, stop it."""
    log = out / (f"{server.name}.log" if rounds == 1 else f"{server.name}-{round_ + 1}.log")
    print(f">> [{server.name}] round {round_ + 1}/{rounds}: starting on port {server.port} "
          f"(log: {log})", flush=True)
    server.start(log)
    try:
        print(f">> [{server.name}] ready after {server.wait_ready():.0f} s", flush=True)
        idle, waited = quiet(server)
        bench.idle.setdefault(server.name, []).append(idle)
        print(f">> [{server.name}] idle CPU: {idle} ms per second (after {waited:.0f} s)",
              flush=True)
        measure(bench, server, loads, round_)
    except Exception as exc:
        print(f">> [{server.name}] failed: {exc}", flush=True)
    finally:
        print(f">> [{server.name}] stopping", flush=True)
        server.stop()


def quiet(server: Server, below_ms: float = 300, longest_s: float = 90) -> tuple[float, float]:
    """Wait until a ready server is idle: its CPU ms per second under `below_ms` over 5 s
    (at most `longest_s`). A server can be "ready" with work still running: a second engine
    finishing its start, a worker spinning after its warm-up; measuring then would charge it
    to the first workload. Returns its idle CPU (ms/s) and the seconds waited."""
    t0 = time.monotonic()
    while True:
        idle = idle_cpu([server], 5)[server.name]
        if idle < below_ms or time.monotonic() - t0 > longest_s:
            return idle, time.monotonic() - t0


def idle_cpu(started: list[Server], seconds: float = 10) -> dict[str, float]:
    """CPU ms per second each server uses with no traffic: what it takes from the others."""
    meters = {s.name: CpuMeter(s.proc.pid) for s in started if s.proc is not None}
    before = {name: m.snapshot() for name, m in meters.items()}
    time.sleep(seconds)
    return {name: round(sum(CpuMeter.per_request_ms(before[name], m.snapshot(),
                                                    int(seconds)).values()), 1)
            for name, m in meters.items()}


def run_interleaved(targets: list[str], make: Callable[[str], Server], loads: list[Workload],
                    args: argparse.Namespace, out: Path, bench: Bench) -> dict[str, float]:
    """All servers up at once, each workload run against one after another, round after
    round: the machine's drift hits every server alike. Returns their idle CPU (ms/s)."""
    started: list[Server] = []
    try:
        for target in targets:
            # Its port is picked only now: servers already up hold ports of their own.
            server = make(target)
            print(f">> [{server.name}] starting on port {server.port} "
                  f"(log: {out}/{server.name}.log)", flush=True)
            server.start(out / f"{server.name}.log")
            started.append(server)
            print(f">> [{server.name}] ready after {server.wait_ready():.0f} s", flush=True)
        idle = idle_cpu(started)
        print(f">> idle CPU, ms per second: {json.dumps(idle)}", flush=True)
        for k in range(args.rounds):
            for w in loads:
                for server in rotated(started, k):
                    print(f">> round {k + 1}/{args.rounds}: {w.name} on {server.name}",
                          flush=True)
                    measure(bench, server, [w], k)
        return idle
    finally:
        for server in started:
            print(f">> [{server.name}] stopping", flush=True)
            server.stop()


def names_arg(value: str, known: tuple[str, ...]) -> list[str]:
    if value.strip() == "all":
        return list(known)
    if value.strip() == "none":
        return []
    return [n.strip() for n in value.split(",") if n.strip()]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--targets", default="vllm,vllm-pooling,rayllm,iris",
                   help="servers to start, one at a time (those no chosen workload is for are "
                   "skipped): vllm (vLLM's server, chat model), vllm-pooling (vLLM's server, "
                   "encoder), rayllm (Ray Serve LLM), iris (`make serve`: both models)")
    p.add_argument("--workloads", default="all",
                   help=f"comma-separated, or all (default): {', '.join(WORKLOADS)}")
    p.add_argument("--requests", type=int, default=40,
                   help="per workload at c=--concurrency (c=1: a quarter, at least 10); "
                   "chat-4turns counts turns")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--warmup", type=int, default=4, help="requests per workload, not measured")
    p.add_argument("--iris-env", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--iris-variant", action="append", default=[],
                   metavar="NAME:KEY=VALUE[,KEY=VALUE]",
                   help="also run Iris with these settings, as target iris-NAME (e.g. "
                   "proxy:IRIS_HTTP__DIRECT_INGRESS=false): one optimisation's effect")
    p.add_argument("--rounds", type=int, default=1,
                   help="repeat the whole sequence, each round starting with another server; "
                   "report medians (the machine's speed drifts between servers)")
    p.add_argument("--interleave", action="store_true",
                   help="start every server first, then run each workload on one after "
                   "another (needs memory for all at once; their idle CPU is reported)")
    p.add_argument("--cache-metrics", default="chat-4turns",
                   help="workloads (comma-separated, all or none) around which each server's "
                   "vLLM cache counters are read from its Prometheus page; with Ray's delayed "
                   "export that adds up to ~20 s per workload on the Ray-based servers")
    p.add_argument("--no-engine-stats", dest="engine_stats", action="store_false",
                   help="start the peers with vLLM's statistics off (--disable-log-stats), as "
                   "runs before the cache figures did; their engine cache figures are then null")
    p.add_argument("--seed", type=int, default=None,
                   help="salt of the run's distinct images (default: random)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()

    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    iris_env = dict(kv.split("=", 1) for kv in args.iris_env)
    variants = dict(parse_variant(v) for v in args.iris_variant)
    targets += list(variants)
    try:
        loads = workloads(args.requests, args.concurrency, args.max_tokens,
                          names_arg(args.workloads, WORKLOADS))
        # A server none of the chosen workloads is for is not started.
        targets = [t for t in targets if any(serves(t, w) for w in loads)]
        scraped = names_arg(args.cache_metrics, WORKLOADS)
        check_names(scraped)
    except ValueError as exc:
        p.error(str(exc))
    out = args.out or ROOT / "load_tests" / "results" / time.strftime("compare-%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    bench = Bench(Images(args.seed), args.warmup, frozenset(scraped))
    print(f">> images: salt {bench.images.salt}", flush=True)

    def make(target: str) -> Server:
        return servers([target], iris_env, variants, args.engine_stats)[0]

    if args.interleave:
        idle = run_interleaved(targets, make, loads, args, out, bench)
    else:
        run_in_turn(targets, make, loads, args, out, bench)
        idle = {n: statistics.median(v) for n, v in bench.idle.items()}
    labels = {w.name: w.label for w in loads}
    table = markdown(bench.results, targets, labels, bench.caches)
    note = (f"Same machine, model {MODEL_ID}, {args.max_tokens} output tokens (ignore_eos), "
            "streaming, images sent as data: URIs; every image and request body made before "
            "the clock, and every distinct image distinct in the whole run (salt "
            f"{bench.images.salt}). Iris env: {iris_env or 'defaults'}"
            + "".join(f"; {n}: {e}" for n, e in variants.items()) + "."
            + (f" Medians over {args.rounds} rounds, req/s range in brackets; each round "
               "started with a different server." if args.rounds > 1 else "")
            + (" Interleaved: all servers ran at once and took turns per workload."
               if args.interleave else "")
            + (" Ready and with no traffic, the servers used, in CPU ms per second, "
               + ", ".join(f"{n} {ms}" for n, ms in idle.items()) + "." if idle else "")
            + "\n\n" + "".join(f"- {describe(w)}\n" for w in loads) + "\n")
    cache_note = (
        "\n## Caches\n\nCached / prompt tokens: summed from every answer's "
        "usage.prompt_tokens_details.cached_tokens (the prefix cache, as each server reports "
        "it to its client). The engine's own counters (vLLM's prefix_cache_queries/hits, in "
        "tokens, and mm_cache_queries/hits, in images), for the workloads in "
        f"--cache-metrics ({', '.join(sorted(bench.scrape)) or 'none'}), are read before and "
        "after the measured requests from the server's Prometheus page: vLLM's /metrics; "
        "for Ray Serve LLM and Iris, Ray's metrics agent (ray_vllm_*), waiting until it has "
        "exported the last request. "
        + ("The peers ran with vLLM's statistics on (as Iris's engine always does)."
           if args.engine_stats else "The peers ran with --disable-log-stats: no engine "
           "counters.") + "\n\n")
    cpu_note = ("\n## Where the CPU goes\n\nCPU time of each server's processes during "
                "the measured requests, per request. vLLM's model worker busy-polls for work, "
                "so its figure includes spinning and grows into whatever CPU is idle.\n\n")
    (out / "results.md").write_text(
        "# Iris vs vLLM vs Ray Serve LLM\n\n" + note + table + cache_note
        + caches_markdown(bench.results, bench.caches, labels) + cpu_note
        + cpu_markdown(bench.cpu, labels))
    (out / "results.json").write_text(json.dumps(
        {"workloads": {w.name: describe(w) for w in loads},
         "image_salt": bench.images.salt,
         "images_made": bench.images.made,
         "generation_s": round(bench.generation_s, 1),
         "results": [r.summary() for r in bench.results],
         "combined": list(combined(bench.results, bench.caches).values()),
         "caches": bench.caches,
         "cpu_ms_per_request": bench.cpu}, indent=2))
    plots = plot(bench.results, targets, out)
    print("\n" + table, flush=True)
    print(f">> made {bench.images.made} distinct images and every body in "
          f"{bench.generation_s:.0f} s, off the clock", flush=True)
    print(f">> wrote {out / 'results.md'} and {', '.join(p.name for p in plots)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
