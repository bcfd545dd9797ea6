"""Image-affinity routing, counted: does a conversation reach the engine that has its image?

    .venv/bin/python -m load_tests.affinity [--conversations 24] [--turns 4] [--images 10]

The production layout (engines in LLMServer, two ChatIngress replicas behind Serve's proxy)
on one local Ray instance, deployed three times with cold caches, each time serving the same
workload:

- `single`: one engine replica (the upper bound: every cache hit there is to be had);
- `default`: two engine replicas, Serve's default router (power of two choices);
- `affinity`: two engine replicas, Iris's ImageAffinityRouter.

The workload: conversations of `--turns` turns, the whole history re-sent every turn (as chat
apps do), whose first user message holds one of `--images` photo-like JPEGs drawn from a Zipf
mix, so popular images are shared between conversations; `--concurrency` conversations at
once. Reported as counts, not timings (the 2-core machine's noise does not decide): the
prefix-cache hit rate (cached / prompt tokens, from vLLM's own counters; the clients' own
`usage.prompt_tokens_details.cached_tokens` agrees), multimodal-cache hits, requests per engine
replica and the busiest replica against the mean; TTFT p50 as well. The last line printed is
one JSON object of the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from load_tests.workload import encoded, stream_chat
from tests.images import data_uri, encode, natural
from tests.servers import free_port

ROOT = Path(__file__).resolve().parent.parent
T0 = time.monotonic()
RUNS = (("single", 1, "power_of_two"), ("default", 2, "power_of_two"),
        ("affinity", 2, "image_affinity"))


def log(msg: str) -> None:
    print(f"[{time.monotonic() - T0:6.1f}s] {msg}", flush=True)


@dataclass(frozen=True)
class Plan:
    conversations: int
    turns: int
    images: int
    concurrency: int
    zipf_s: float
    max_tokens: int


def conversations(plan: Plan) -> list[list[str]]:
    """Per conversation, its first image (as a data: URI) and its questions, from a fixed
    seed: every run sends the same traffic."""
    rng = random.Random(17)
    pool = [data_uri(encode(natural(640, 480, seed=900 + i), "JPEG"), "image/jpeg")
            for i in range(plan.images)]
    weights = [1 / (rank + 1) ** plan.zipf_s for rank in range(plan.images)]
    out = []
    for c in range(plan.conversations):
        image = rng.choices(pool, weights)[0]
        out.append([image, *(f"Conversation {c}, question {t}: and what else?"
                             for t in range(plan.turns))])
    return out


def config(name: str, replicas: int, router: str, port: int) -> Any:
    from handlers.config_load import load_config

    return load_config(
        use_yaml=False, app_name=f"affinity-{name}",
        model={"id": "demo-vlm", "source": ".models/demo-vlm"},
        engine={"max_model_len": 4096, "dtype": "float32", "enforce_eager": True,
                "max_num_seqs": 16, "env": {"VLLM_CPU_KVCACHE_SPACE": "1"}},
        fetch={"allow_private_networks": True},
        http={"host": "127.0.0.1", "port": port},
        deployments={
            "engine_in_ingress": False, "llm_router": router,
            "ingress": {"num_replicas": 2, "num_cpus": 0.25},
            "llm": {"num_replicas": replicas, "num_cpus": 1},
            "fetcher": {"num_replicas": 1, "num_cpus": 0.25},
            "preprocessor": {"num_replicas": 1, "num_cpus": 0.5},
        })


def engine_counters(app: str) -> dict[str, dict[str, int]]:
    """{replica: vLLM's cache counters and finished requests so far}, read from each engine
    replica itself."""
    import ray

    from tests.support import replica_actors

    out = {}
    for actor in replica_actors(app, "LLMServer"):
        stats = ray.get(actor.record_routing_stats.remote(), timeout=60)
        out[str(stats["engine_pids"][0])] = {
            k: int(stats[k]) for k in ("prefix_cache_queries", "prefix_cache_hits",
                                       "mm_cache_queries", "mm_cache_hits",
                                       "requests_finished")}
    return out


async def converse(client: httpx.AsyncClient, url: str, conv: list[str], plan: Plan,
                   ttft: list[float], usage: list[dict[str, Any]], failed: list[str]) -> None:
    image, *questions = conv
    history: list[dict[str, Any]] = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": image}},
        {"type": "text", "text": questions[0]}]}]
    for turn, question in enumerate(questions):
        if turn:
            history.append({"role": "user", "content": question})
        body = {"model": "demo-vlm", "messages": history, "max_tokens": plan.max_tokens,
                "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
        res = await stream_chat(client, url, encoded(body))
        if not res.ok:
            failed.append(res.error)
            return
        ttft.append(res.first_token_s or res.e2e_s or 0.0)
        if res.usage:
            usage.append(res.usage)
        history.append({"role": "assistant", "content": res.text or "ok"})


async def drive(url: str, convs: list[list[str]], plan: Plan) -> dict[str, Any]:
    ttft: list[float] = []
    usage: list[dict[str, Any]] = []
    failed: list[str] = []
    queue: asyncio.Queue[list[str]] = asyncio.Queue()
    for c in convs:
        queue.put_nowait(c)
    async with httpx.AsyncClient(timeout=httpx.Timeout(300, connect=10)) as client:
        async def worker() -> None:
            while not queue.empty():
                await converse(client, url, queue.get_nowait(), plan, ttft, usage, failed)
        await asyncio.gather(*(worker() for _ in range(plan.concurrency)))
    prompt = sum(int(u["prompt_tokens"]) for u in usage)
    cached = sum(int((u.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
                 for u in usage)
    return {"ttft_p50_ms": round(1000 * statistics.median(ttft), 1) if ttft else None,
            "client_hit_rate": round(cached / prompt, 4) if prompt else None,
            "failed": failed}


def summarise(before: dict[str, dict[str, int]], after: dict[str, dict[str, int]]
              ) -> dict[str, Any]:
    delta = {r: {k: v - before.get(r, {}).get(k, 0) for k, v in c.items()}
             for r, c in after.items()}
    total = {k: sum(d[k] for d in delta.values()) for k in next(iter(delta.values()))}
    per_replica = sorted((d["requests_finished"] for d in delta.values()), reverse=True)
    mean = statistics.fmean(per_replica)
    return {
        "hit_rate": round(total["prefix_cache_hits"] / max(1, total["prefix_cache_queries"]), 4),
        "mm_hit_rate": round(total["mm_cache_hits"] / max(1, total["mm_cache_queries"]), 4),
        "mm_hits": total["mm_cache_hits"], "mm_queries": total["mm_cache_queries"],
        "requests_per_replica": per_replica,
        "max_over_mean": round(per_replica[0] / mean, 3) if mean else None,
    }


def run_one(name: str, replicas: int, router: str, convs: list[list[str]], plan: Plan,
            proxy_port: int) -> dict[str, Any]:
    from ray import serve

    from deployments.app import build_app

    cfg = config(name, replicas, router, proxy_port)
    t = time.monotonic()
    serve.run(build_app(cfg), name=cfg.app_name, route_prefix=f"/{name}", blocking=False)
    while not str(getattr(serve.status().applications.get(cfg.app_name), "status", "")
                  ).endswith("RUNNING"):
        if time.monotonic() - t > 900:
            raise TimeoutError(f"{cfg.app_name} not running after 900 s")
        time.sleep(1)
    log(f"{name}: {replicas} engine replica(s), {router} router, ready in "
        f"{time.monotonic() - t:.0f} s")
    before = engine_counters(cfg.app_name)
    t = time.monotonic()
    client = asyncio.run(drive(f"http://127.0.0.1:{proxy_port}/{name}/v1/chat/completions",
                               convs, plan))
    out = {**summarise(before, engine_counters(cfg.app_name)), **client,
           "wall_s": round(time.monotonic() - t, 1)}
    log(f"{name}: " + json.dumps({k: v for k, v in out.items() if k != "failed"})
        + f", failed {len(out['failed'])}")
    serve.delete(cfg.app_name)  # cold caches for the next run; frees its CPUs
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conversations", type=int, default=24)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--images", type=int, default=10)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--zipf-s", type=float, default=1.1)
    parser.add_argument("--max-tokens", type=int, default=8)
    args = parser.parse_args(argv)
    plan = Plan(args.conversations, args.turns, args.images, args.concurrency, args.zipf_s,
                args.max_tokens)
    os.environ.pop("RAY_ADDRESS", None)

    from ray import serve

    from deployments.run import init_ray, stop

    convs = conversations(plan)  # before any clock: image making is not the servers' time
    shared = len(convs) - len({c[0] for c in convs})
    log(f"{len(convs)} conversations x {plan.turns} turns, {plan.images} images "
        f"(zipf s={plan.zipf_s}; {shared} conversations reuse an earlier one's image)")
    proxy_port = free_port()
    results: dict[str, dict[str, Any]] = {}
    try:
        init_ray(config("init", 1, "power_of_two", proxy_port), num_cpus=8,
                 runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}}, log_to_driver=False)
        serve.start(http_options={"host": "127.0.0.1", "port": proxy_port})
        for name, replicas, router in RUNS:
            results[name] = run_one(name, replicas, router, convs, plan, proxy_port)
    finally:
        stop()
    single, default, affinity = (results[n] for n, _, _ in RUNS)
    summary = {
        "single_hit_rate": single["hit_rate"], "default_hit_rate": default["hit_rate"],
        "affinity_hit_rate": affinity["hit_rate"],
        "affinity_over_single": round(affinity["hit_rate"] / single["hit_rate"], 3)
        if single["hit_rate"] else None,
        "default_max_over_mean": default["max_over_mean"],
        "affinity_max_over_mean": affinity["max_over_mean"],
        "mm_hit_rate": {n: r["mm_hit_rate"] for n, r in results.items()},
        "requests_per_replica": {n: r["requests_per_replica"] for n, r in results.items()},
        "client_hit_rate": {n: r["client_hit_rate"] for n, r in results.items()},
        "ttft_p50_ms": {n: r["ttft_p50_ms"] for n, r in results.items()},
        "failed_requests": sum(len(r["failed"]) for r in results.values()),
        "errors": [e for r in results.values() for e in r["failed"]][:5],
    }
    print(json.dumps(summary), flush=True)
    return 0 if summary["failed_requests"] == 0 else 1


if __name__ == "__main__":
    os.chdir(ROOT)
    sys.exit(main())
