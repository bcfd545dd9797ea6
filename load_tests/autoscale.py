"""Autoscaling end to end on a local multi-node Ray cluster: scale from zero, to two GPU
nodes, and back to zero.

    .venv/bin/python -m load_tests.autoscale [--short]

A head node (CPU only, the only node with the `iris_cpu_node` resource, so the ingress,
fetcher and preprocessor live there) and two simulated GPU worker nodes (one logical GPU
each; vLLM still runs on CPU) are started with `ray.cluster_utils.Cluster`. Iris is deployed
with LLMServer at zero replicas (num_gpus=1, so at most one replica per GPU node), then:

1. cold start: a streaming chat request with an image while LLMServer has no replica (it
   waits in the ingress's queue, Serve starts a replica, the request succeeds);
2. load: concurrent streaming requests until LLMServer runs two replicas on two nodes;
3. idle until LLMServer is back at zero replicas.

The last line printed is one JSON object with the results. Everything is bounded in time
and request count, and the cluster is always shut down.

Why not `ray.cluster_utils.AutoscalingCluster` (fake multi-node provider, nodes launched on
demand)? On Ray 2.60 it is impractical here: the wheel does not ship the
`fake_multi_node/example.yaml` its constructor reads (FileNotFoundError), and its
`start()`/`shutdown()` run `ray stop --force`, which kills every Ray process on the machine
(other clusters included), and `ray start --head` on the default ports. The GPU nodes are
therefore added up front; Serve's replica autoscaling (the part Iris configures) is the same.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import httpx
import yaml

from load_tests.cluster import (
    CPU_NODE_RESOURCE,
    llm_node_ids,
    no_address_file,
    replica_counts,
    running,
    start_cluster,
    total,
)
from load_tests.workload import StreamResult, chat_body, encoded, stream_chat
from tests.images import data_uri, encode, pattern
from tests.servers import free_port

ROOT = Path(__file__).resolve().parent.parent
APP_NAME = "iris-autoscale"
LLM = "LLMServer"
PREP = "ImagePreprocessor"
FETCHER = "ImageFetcher"


@dataclass(frozen=True)
class Plan:
    """How long and how hard each phase runs."""

    concurrency: int
    max_tokens: int
    max_load_requests: int
    load_timeout_s: float
    settle_s: float  # keep the load on this long once both replicas answer
    downscale_delay_s: float
    look_back_period_s: float
    idle_timeout_s: float
    deploy_timeout_s: float = 240.0
    cold_timeout_s: float = 300.0


FULL = Plan(concurrency=8, max_tokens=384, max_load_requests=2000, load_timeout_s=420,
            settle_s=20, downscale_delay_s=20, look_back_period_s=10, idle_timeout_s=240)
SHORT = Plan(concurrency=6, max_tokens=256, max_load_requests=1000, load_timeout_s=330,
             settle_s=5, downscale_delay_s=10, look_back_period_s=5, idle_timeout_s=150)


@dataclass
class Tally:
    requests: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)

    def fail(self, why: str) -> None:
        self.failed += 1
        if len(self.errors) < 20:
            self.errors.append(why)
        log("FAIL", why)


T0 = time.monotonic()


def log(phase: str, msg: str) -> None:
    print(f"[{time.monotonic() - T0:6.1f}s] {phase}: {msg}", flush=True)


# --------------------------------------------------------------------------- config


def iris_config(plan: Plan, port: int, api_key: str) -> Any:
    """The local engine settings (infra/local.yaml) with autoscaled deployments."""
    from handlers.config_load import load_config

    local = yaml.safe_load((ROOT / "infra" / "local.yaml").read_text())
    engine = dict(local.get("engine") or {})
    engine["env"] = {"VLLM_CPU_KVCACHE_SPACE": "1", **(engine.get("env") or {})}
    # One SSE chunk per 8 tokens (the first still comes at once): on 2 shared cores the
    # per-chunk relaying through Serve otherwise starves the second engine's start-up.
    engine["extra_args"] = {"stream_interval": 8, **(engine.get("extra_args") or {})}
    on_cpu_node = {CPU_NODE_RESOURCE: 0.01}
    common = {"upscale_delay_s": 2, "downscale_delay_s": plan.downscale_delay_s,
              "look_back_period_s": plan.look_back_period_s, "metrics_interval_s": 1}
    deployments = {
        "ingress": {"num_replicas": 1, "num_cpus": 0.5, "max_ongoing_requests": 256,
                    "resources": on_cpu_node},
        "fetcher": {"autoscaling_config": {"min_replicas": 1, "max_replicas": 3,
                                           "target_ongoing_requests": 2, **common},
                    "num_cpus": 0.25, "max_ongoing_requests": 64, "resources": on_cpu_node},
        "preprocessor": {"autoscaling_config": {"min_replicas": 1, "max_replicas": 2,
                                                "target_ongoing_requests": 1, **common},
                         "num_cpus": 1, "max_ongoing_requests": 16, "resources": on_cpu_node},
        "llm": {"autoscaling_config": {"min_replicas": 0, "initial_replicas": 0,
                                       "max_replicas": 2, "target_ongoing_requests": 2,
                                       **common},
                "num_cpus": 1, "num_gpus": 1, "max_ongoing_requests": 16},
    }
    return load_config(
        use_yaml=False,
        model=local.get("model") or {},
        engine=engine,
        fetch=local.get("fetch") or {},
        deployments=deployments,
        http={"host": "127.0.0.1", "port": port},
        app_name=APP_NAME,
        api_key=[api_key],
    )


# --------------------------------------------------------------------------- scenario


def images(n: int = 4, side: int = 448) -> list[str]:
    """Distinct PNGs as data: URIs."""
    return [data_uri(encode(pattern(side, side, seed=s))) for s in range(n)]


@dataclass
class Outcome:
    max_llm_replicas: int = 0
    max_preprocessor_replicas: int = 0
    max_fetcher_replicas: int = 0
    llm_nodes: set[str] = field(default_factory=set)
    scaled_to_zero: bool = False
    cold_start_s: float | None = None

    def observe(self, counts: dict[str, dict[str, int]]) -> None:
        self.max_llm_replicas = max(self.max_llm_replicas, running(counts, LLM))
        self.max_preprocessor_replicas = max(self.max_preprocessor_replicas,
                                             running(counts, PREP))
        self.max_fetcher_replicas = max(self.max_fetcher_replicas, running(counts, FETCHER))


def fmt(counts: dict[str, dict[str, int]]) -> str:
    def one(name: str) -> str:
        states = counts.get(name) or {}
        return "/".join(f"{k.lower()}={v}" for k, v in sorted(states.items()) if v) or "0"
    return f"LLMServer[{one(LLM)}] preprocessor[{one(PREP)}] fetcher[{one(FETCHER)}]"


async def status(out: Outcome) -> dict[str, dict[str, int]]:
    counts = await asyncio.to_thread(replica_counts, APP_NAME)
    out.observe(counts)
    return counts


async def cold_start(client: httpx.AsyncClient, url: str, bodies: list[bytes],
                     plan: Plan, out: Outcome, tally: Tally) -> None:
    counts = await status(out)
    if total(counts, LLM) != 0:
        raise RuntimeError(f"LLMServer should be at zero replicas: {fmt(counts)}")
    log("cold", f"LLMServer at zero replicas; sending a streaming request ({fmt(counts)})")
    first = asyncio.create_task(stream_chat(client, url, bodies[0]))
    # A second request while still at zero: it must wait as well, then succeed.
    await asyncio.sleep(1.0)
    counts = await status(out)
    extra: asyncio.Task[StreamResult] | None = None
    if running(counts, LLM) == 0:
        log("cold", f"second request while LLMServer has no running replica ({fmt(counts)})")
        extra = asyncio.create_task(stream_chat(client, url, bodies[1]))
    deadline = time.monotonic() + plan.cold_timeout_s
    last = ""
    while not first.done() and time.monotonic() < deadline:
        counts = await status(out)
        line = fmt(counts)
        if line != last:
            log("cold", f"waiting for the first token ... {line}")
            last = line
        await asyncio.sleep(1.0)
    results = [await first] + ([await extra] if extra else [])
    for i, res in enumerate(results):
        tally.requests += 1
        if not res.ok:
            tally.fail(f"cold request {i}: {res.error}")
    res = results[0]
    if res.ok:
        out.cold_start_s = round(res.first_token_s or res.first_chunk_s or 0.0, 2)
        log("cold", f"first token after {out.cold_start_s:.1f} s (first chunk "
                    f"{res.first_chunk_s:.1f} s); {len(results)} cold request(s) succeeded: "
                    f"{sum(r.ok for r in results)}")


async def load(client: httpx.AsyncClient, url: str, bodies: list[bytes], plan: Plan,
               out: Outcome, tally: Tally, handle: Any) -> None:
    out.llm_nodes |= await llm_node_ids(handle)
    log("load", f"LLMServer node(s) so far: {sorted(n[:8] for n in out.llm_nodes)}; "
                f"{plan.concurrency} concurrent streams of {plan.max_tokens} tokens")
    stop = asyncio.Event()
    sent = 0
    done = 0

    async def worker(i: int) -> None:
        nonlocal sent, done
        while not stop.is_set() and sent < plan.max_load_requests:
            sent += 1
            res = await stream_chat(client, url, bodies[(i + sent) % len(bodies)])
            tally.requests += 1
            done += 1
            if not res.ok:
                tally.fail(f"load request: {res.error}")

    workers = [asyncio.create_task(worker(i)) for i in range(plan.concurrency)]
    deadline = time.monotonic() + plan.load_timeout_s
    reached: float | None = None
    last_log = 0.0
    while time.monotonic() < deadline and not all(w.done() for w in workers):
        counts = await status(out)
        if running(counts, LLM) >= 1:
            out.llm_nodes |= await llm_node_ids(handle)
        if time.monotonic() - last_log >= 5:
            log("load", f"{done} done / {tally.failed} failed; {fmt(counts)}; "
                        f"LLMServer nodes {sorted(n[:8] for n in out.llm_nodes)}")
            last_log = time.monotonic()
        if running(counts, LLM) >= 2 and len(out.llm_nodes) >= 2:
            if reached is None:
                reached = time.monotonic()
                log("load", f"LLMServer at 2 replicas on 2 nodes; keeping the load on "
                            f"{plan.settle_s:.0f} s more")
            elif time.monotonic() - reached >= plan.settle_s:
                break
        await asyncio.sleep(1.0)
    stop.set()
    log("load", f"stopping: letting {sent - done} in-flight request(s) finish")
    await asyncio.wait_for(asyncio.gather(*workers), timeout=plan.cold_timeout_s)
    log("load", f"{done} load requests done, {tally.failed} failed so far; "
                f"max LLMServer replicas {out.max_llm_replicas}, "
                f"max preprocessor replicas {out.max_preprocessor_replicas}, "
                f"max fetcher replicas {out.max_fetcher_replicas}")


async def idle(client: httpx.AsyncClient, base: str, plan: Plan, out: Outcome,
               tally: Tally) -> None:
    log("idle", f"no traffic; waiting up to {plan.idle_timeout_s:.0f} s for LLMServer to reach 0")
    deadline = time.monotonic() + plan.idle_timeout_s
    last = ""
    last_probe = 0.0
    while time.monotonic() < deadline:
        counts = await status(out)
        line = fmt(counts)
        if line != last:
            log("idle", line)
            last = line
        if time.monotonic() - last_probe >= 10:
            # The CPU side keeps answering while the GPU side scales down (no LLM traffic).
            last_probe = time.monotonic()
            try:
                resp = await client.get(f"{base}/models")
                if resp.status_code != 200:
                    tally.fail(f"GET /v1/models during idle: HTTP {resp.status_code}")
            except Exception as exc:
                tally.fail(f"GET /v1/models during idle: {type(exc).__name__}: {exc}")
        if total(counts, LLM) == 0:
            out.scaled_to_zero = True
            log("idle", f"LLMServer back at zero replicas ({line})")
            return
        await asyncio.sleep(1.0)
    log("idle", f"LLMServer did not reach zero within {plan.idle_timeout_s:.0f} s")


async def scenario(plan: Plan, cfg: Any, api_key: str, out: Outcome, tally: Tally) -> None:
    from ray import serve

    base = f"http://{cfg.http.host}:{cfg.http.port}/v1"
    url = f"{base}/chat/completions"
    bodies = [encoded(chat_body(cfg.model.id, img, plan.max_tokens)) for img in images()]
    handle = serve.get_deployment_handle(LLM, APP_NAME)
    timeout = httpx.Timeout(plan.cold_timeout_s, connect=10)
    limits = httpx.Limits(max_connections=plan.concurrency + 4)
    headers = {"Authorization": f"Bearer {api_key}"}
    async with httpx.AsyncClient(timeout=timeout, limits=limits, headers=headers) as client:
        await cold_start(client, url, bodies, plan, out, tally)
        if out.cold_start_s is None:
            log("cold", "cold start failed; skipping the load phase")
        else:
            await load(client, url, bodies, plan, out, tally, handle)
        await idle(client, base, plan, out, tally)


def _terminate(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # so the finally blocks shut the cluster down


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--short", action="store_true",
                        help="fewer requests and shorter delays (used by the test)")
    args = parser.parse_args(argv)
    plan = SHORT if args.short else FULL
    signal.signal(signal.SIGTERM, _terminate)
    os.environ.pop("RAY_ADDRESS", None)  # this script starts and uses its own cluster

    import ray
    from ray import serve

    from deployments.app import build_app

    port = free_port()
    api_key = secrets.token_urlsafe(16)
    cfg = iris_config(plan, port, api_key)
    out, tally = Outcome(), Tally()
    # Short path: Unix socket names under it must stay below ~107 characters.
    temp_dir = tempfile.mkdtemp(prefix="iris-as-", dir="/tmp")
    cluster = None
    ok = False
    try:
        log("cluster", f"starting head (4 CPUs) + 2 GPU nodes (2 CPUs, 1 GPU each) in {temp_dir}")
        cluster = start_cluster(temp_dir)
        head = cluster.head_node.node_id
        workers = sorted(n.node_id for n in cluster.worker_nodes)
        log("cluster", f"up at {cluster.address}: head {head[:8]}, GPU nodes "
                       f"{[w[:8] for w in workers]}")
        ray.init(address=cluster.address, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
        serve.start(proxy_location="HeadOnly",
                    http_options={"host": cfg.http.host, "port": cfg.http.port})
        log("deploy", f"deploying {APP_NAME!r} on 127.0.0.1:{port} (LLMServer min 0 / max 2, "
                      f"num_gpus=1)")
        t = time.monotonic()
        serve.run(build_app(cfg), name=APP_NAME, route_prefix="/", blocking=False)
        counts = replica_counts(APP_NAME)
        out.observe(counts)
        log("deploy", f"ready in {time.monotonic() - t:.0f} s: {fmt(counts)}")
        asyncio.run(scenario(plan, cfg, api_key, out, tally))
        stray = out.llm_nodes - set(workers)
        if stray:
            tally.fail(f"LLMServer ran on non-GPU node(s): {sorted(stray)}")
        ok = True
    except BaseException as exc:
        log("error", f"{type(exc).__name__}: {exc}")
        tally.failed += 1
        if isinstance(exc, KeyboardInterrupt | SystemExit):
            raise
    finally:
        log("shutdown", "stopping Serve and the cluster")
        for step in (serve.shutdown, ray.shutdown):
            try:
                step()
            except Exception as exc:
                log("shutdown", f"{step.__name__}: {type(exc).__name__}: {exc}")
        if cluster is not None:
            with no_address_file():
                cluster.shutdown()
        good = (ok and out.max_llm_replicas == 2 and len(out.llm_nodes) == 2
                and tally.failed == 0 and out.scaled_to_zero)
        if good:
            shutil.rmtree(temp_dir, ignore_errors=True)
        else:
            log("shutdown", f"Ray logs kept in {temp_dir}")
        summary = {
            "max_llm_replicas": out.max_llm_replicas,
            "nodes_used": len(out.llm_nodes),
            "failed_requests": tally.failed,
            "scaled_to_zero": out.scaled_to_zero,
            "cold_start_s": out.cold_start_s,
            "requests": tally.requests,
        }
        log("done", f"max preprocessor replicas {out.max_preprocessor_replicas}, max fetcher "
                    f"replicas {out.max_fetcher_replicas}, wall {time.monotonic() - T0:.0f} s"
                    + (f"; errors: {tally.errors}" if tally.errors else ""))
        print(json.dumps(summary), flush=True)
    return 0 if good else 1


if __name__ == "__main__":
    os.chdir(ROOT)
    sys.exit(main())
