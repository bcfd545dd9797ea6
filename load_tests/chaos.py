"""Fault injection on real Ray, Serve and vLLM: what clients see when replicas die, scale
away, hang, or their node goes.

    .venv/bin/python -m load_tests.chaos [--short]

A local two-node Ray cluster (`ray.cluster_utils.Cluster`: a head, and a worker node that
only preprocessor replicas use, so it can be removed) runs Iris in both layouts, behind
Serve's proxy: `local` (the engine inside ChatIngress) and `split` (the engine in LLMServer,
two ChatIngress replicas). Faults, each under its own load:

1. SIGKILL the ImagePreprocessor replica, then the ImageFetcher replica, while 40 requests
   with distinct images run at concurrency 4; then the only EmbeddingServer replica under
   40 /v1/embeddings requests (they wait for its replacement: the call is retried);
2. scale the preprocessor 2 -> 1 while requests are queued behind the engine, then send a
   data: image its stopped replica prepared;
3. SIGKILL vLLM's EngineCore during a long stream, in both layouts: the stream must end
   with Iris's envelope, new requests get 503 + Retry-After until the engine is back; then
   SIGKILL the split layout's LLMServer replica itself during a long stream: the stream
   ends with the envelope (engine_unavailable), requests sent right after it are answered
   by the replacement;
4. scale ChatIngress 2 -> 1 while long streams run on both replicas;
5. kill the Serve controller under load;
6. remove the worker node (preprocessor replicas) under load;
7. 8 s3:// images that hang after their first bytes, then a 9th from a healthy bucket.

Every request must succeed (or, for 3, get the stated error); engine processes must not
outlive their engine. The last line printed is one JSON object of figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import httpx
import psutil

from load_tests.cluster import no_address_file
from load_tests.workload import (
    StreamResult,
    chat_body,
    embed_body,
    encoded,
    post_embedding,
    stream_chat,
)
from tests.images import data_uri, encode, natural
from tests.servers import HangingS3Proxy, S3Server, free_port

ROOT = Path(__file__).resolve().parent.parent
API_KEY = "iris-chaos-key"
PREP_NODE = "chaos_prep_node"  # only the removable worker node offers it
LAYOUTS = ("local", "split")
NOT_STREAMED = {"stream": False, "stream_options": None}
T0 = time.monotonic()


def log(phase: str, msg: str) -> None:
    print(f"[{time.monotonic() - T0:6.1f}s] {phase}: {msg}", flush=True)


@dataclass(frozen=True)
class Plan:
    requests: int  # per load phase
    concurrency: int
    long_tokens: int  # a long stream (the demo model makes ~100-200 tokens/s here)


FULL = Plan(requests=40, concurrency=4, long_tokens=3500)
SHORT = Plan(requests=40, concurrency=4, long_tokens=3000)


@dataclass
class Figures:
    failed: dict[str, int] = field(default_factory=dict)
    requests: int = 0
    replaced: dict[str, bool] = field(default_factory=dict)
    replaced_s: dict[str, float] = field(default_factory=dict)
    recovery_s: dict[str, float | None] = field(default_factory=dict)
    envelope: dict[str, bool] = field(default_factory=dict)
    refused_with_retry_after: dict[str, bool] = field(default_factory=dict)
    orphans: int = 0
    drained_streams_completed: bool = False
    repeat_after_scale_down_ok: bool = False
    hung_s3_delayed_healthy: bool | None = None
    errors: list[str] = field(default_factory=list)

    def note(self, fault: str, failed: int, errors: list[str]) -> None:
        self.failed[fault] = self.failed.get(fault, 0) + failed
        self.errors += [f"{fault}: {e}" for e in errors[:5]]


# --------------------------------------------------------------------------- the apps


def configs(proxy_port: int, plan: Plan) -> dict[str, Any]:
    from handlers.config_load import load_config

    common: dict[str, Any] = {
        "model": {"id": "demo-vlm", "source": ".models/demo-vlm"},
        "engine": {"max_model_len": 4096, "dtype": "float32", "enforce_eager": True,
                   "max_num_seqs": 16, "env": {"VLLM_CPU_KVCACHE_SPACE": "1"}},
        "fetch": {"allow_private_networks": True, "s3_allowed_buckets": ["*"],
                  "total_timeout_s": 20, "read_timeout_s": 20},
        # scale_preprocessor's 16 long streams share one CPU engine: on a slow day (this
        # machine at half speed, 2026-12-03) they took longer than 180 s and hit the deadline.
        "limits": {"request_timeout_s": 600},
        "http": {"host": "127.0.0.1", "port": proxy_port},
        "api_key": [API_KEY],
    }
    health = {"health_check_period_s": 2, "health_check_timeout_s": 10}
    encoder = {"id": "demo-clip", "source": ".models/demo-clip", "dtype": "float32"}
    local = load_config(use_yaml=False, **common, app_name="chaos-local", encoder=encoder,
                        deployments={
        "engine_in_ingress": True,
        "ingress": {"num_replicas": 1, "num_cpus": 0.5, "max_ongoing_requests": 256},
        "llm": {"num_replicas": 1, "num_cpus": 1, "max_ongoing_requests": 16, **health},
        "fetcher": {"num_replicas": 1, "num_cpus": 0.25, **health},
        "preprocessor": {"num_replicas": 2, "num_cpus": 0.5, "resources": {PREP_NODE: 1},
                         **health},
        "encoder": {"num_replicas": 1, "num_cpus": 0.5, **health},
    })
    split = load_config(use_yaml=False, **common, app_name="chaos-split", deployments={
        "engine_in_ingress": False,
        "ingress": {"num_replicas": 2, "num_cpus": 0.25, "max_ongoing_requests": 256},
        "llm": {"num_replicas": 1, "num_cpus": 1, "max_ongoing_requests": 16, **health},
        "fetcher": {"num_replicas": 1, "num_cpus": 0.25, **health},
        "preprocessor": {"num_replicas": 1, "num_cpus": 0.5, **health},
    })
    return {"local": local, "split": split}


def deploy(cfg: Any, prefix: str) -> None:
    from ray import serve

    from deployments.app import build_app

    serve.run(build_app(cfg), name=cfg.app_name, route_prefix=prefix, blocking=False)


def replicas(app: str, deployment: str) -> list[Any]:
    import ray

    prefix = f"SERVE_REPLICA::{app}#{deployment}#"
    return [ray.get_actor(a["name"], namespace="serve")
            for a in ray.util.list_named_actors(all_namespaces=True)
            if a["namespace"] == "serve" and a["name"].startswith(prefix)]


def replica_pid(actor: Any) -> int:
    import ray

    return int(ray.get(actor.__ray_call__.remote(lambda _: os.getpid()), timeout=30))


def running(app: str, deployment: str) -> int:
    from ray import serve

    status = serve.status().applications.get(app)
    if status is None or deployment not in status.deployments:
        return 0
    states = status.deployments[deployment].replica_states
    return int(sum(v for k, v in states.items() if str(getattr(k, "value", k)) == "RUNNING"))


async def until(check: Callable[[], bool], guard_s: float, what: str) -> float:
    """Seconds until `check()` holds; raises past the guard."""
    t0 = time.monotonic()
    while not await asyncio.to_thread(check):
        if time.monotonic() - t0 > guard_s:
            raise TimeoutError(f"never: {what}")
        await asyncio.sleep(0.5)
    return time.monotonic() - t0


# --------------------------------------------------------------------------- load


def fresh_images(n: int, seed: int) -> list[str]:
    """Distinct photo-like JPEGs as data: URIs, made before any clock starts."""
    return [data_uri(encode(natural(320, 240, seed=seed + i), "JPEG"), "image/jpeg")
            for i in range(n)]


Send = Callable[[httpx.AsyncClient, str, bytes], Awaitable[StreamResult]]


async def load(client: httpx.AsyncClient, url: str, bodies: list[bytes], concurrency: int,
               fault: Callable[[], Awaitable[None]] | None = None, after: int = 4,
               send: Send = stream_chat) -> tuple[int, list[str]]:
    """Every body once, `concurrency` at a time; `fault()` runs once `after` have finished.
    (failed, errors)."""
    sem = asyncio.Semaphore(concurrency)
    done = 0
    triggered = asyncio.Event()
    errors: list[str] = []

    async def one(body: bytes) -> None:
        nonlocal done
        async with sem:
            res = await send(client, url, body)
        done += 1
        if not res.ok:
            errors.append(res.error)
        if done >= after:
            triggered.set()

    tasks = [asyncio.create_task(one(b)) for b in bodies]
    if fault is not None:
        await triggered.wait()
        await fault()
    await asyncio.gather(*tasks)
    return len(errors), errors


# --------------------------------------------------------------------------- faults


def engine_tree(actor: Any) -> list[int]:
    """The pids of the engine a replica holds: its core process and what that started."""
    import ray

    core = ray.get(actor.record_routing_stats.remote(), timeout=30)["engine_pids"][0]
    return [core, *(p.pid for p in psutil.Process(core).children(recursive=True))]


def alive(pids: list[int]) -> list[int]:
    out = []
    for p in pids:
        try:
            if psutil.Process(p).status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:  # gone, or reaped while we looked
            continue
    return out


def survivors(pids: list[int], guard_s: float = 60) -> list[int]:
    """The processes still alive after up to `guard_s`: dying ones get their time (a
    vLLM process notices its parent's death within seconds, longer on busy cores)."""
    t0 = time.monotonic()
    while (left := alive(pids)) and time.monotonic() - t0 < guard_s:
        time.sleep(0.5)
    return left


async def kill_replica_under_load(name: str, app: str, deployment: str, url: str,
                                  bodies: list[bytes], client: httpx.AsyncClient,
                                  plan: Plan, fig: Figures, send: Send = stream_chat,
                                  engine: bool = False) -> None:
    """SIGKILL the deployment's first replica once 4 requests of the load have finished;
    every request must still succeed, and a new replica must run. `engine`: the replica
    holds one, whose processes must end with it (handlers/reaper.py)."""
    (actor, *_) = replicas(app, deployment)
    pid = replica_pid(actor)
    engine_pids = engine_tree(actor) if engine else []
    want = running(app, deployment)
    before = {a._actor_id for a in replicas(app, deployment)}
    killed_at = time.monotonic()

    async def fault() -> None:
        nonlocal killed_at
        log(name, f"SIGKILL {deployment} replica (pid {pid})")
        killed_at = time.monotonic()
        os.kill(pid, signal.SIGKILL)

    failed, errors = await load(client, url, bodies, plan.concurrency, fault, send=send)
    fig.requests += len(bodies)
    fig.note(name, failed, errors)
    left = await asyncio.to_thread(survivors, engine_pids)
    fig.orphans += len(left)
    # Replaced: a replica that was not there before the kill runs, and as many as before.
    await until(lambda: running(app, deployment) >= want and bool(
        {a._actor_id for a in replicas(app, deployment)} - before), 180,
        f"{deployment} replaced")
    fig.replaced[name] = True
    fig.replaced_s[name] = round(time.monotonic() - killed_at, 1)
    log(name, f"{len(bodies)} requests, {failed} failed; a new replica running "
              f"{fig.replaced_s[name]:.0f} s after the kill (at most: checked after the load)"
        + (f"; the dead replica's engine processes left: {len(left)}" if engine else ""))


async def scale_preprocessor_down(cfg: Any, url: str, client: httpx.AsyncClient, plan: Plan,
                                  fig: Figures) -> None:
    """Requests queued behind a busy engine while the preprocessor goes from 2 to 1; then
    an image that the stopped replica prepared, sent again."""
    name = "scale_preprocessor"
    images = fresh_images(8, seed=500)
    long_body = encoded(chat_body(cfg.model.id, images[0], plan.long_tokens))
    # Fill the engine (16 slots) with long streams, so the image requests queue behind it.
    blockers = [asyncio.create_task(stream_chat(client, url, long_body)) for _ in range(16)]
    await asyncio.sleep(2)
    queued = [asyncio.create_task(stream_chat(client, url, encoded(
        chat_body(cfg.model.id, img, 4)))) for img in images]
    await asyncio.sleep(3)  # prepared by now, waiting for the engine
    d = cfg.deployments
    smaller = cfg.model_copy(update={"deployments": d.model_copy(update={
        "preprocessor": d.preprocessor.model_copy(update={"num_replicas": 1})})})
    log(name, "preprocessor 2 -> 1 with requests queued behind the engine")
    await asyncio.to_thread(deploy, smaller, "/local")
    await until(lambda: running(cfg.app_name, "ImagePreprocessor") == 1, 180, "scaled to 1")
    results = await asyncio.gather(*queued, *blockers)
    failed = [r.error for r in results if not r.ok]
    fig.requests += len(results)
    fig.note(name, len(failed), failed)
    again = await asyncio.gather(*(stream_chat(client, url, encoded(
        chat_body(cfg.model.id, img, 4))) for img in images))
    fig.requests += len(again)
    fig.repeat_after_scale_down_ok = all(r.ok for r in again)
    fig.note(name, sum(not r.ok for r in again), [r.error for r in again if not r.ok])
    log(name, f"{len(results)} requests, {len(failed)} failed; the same images again: "
              f"{sum(r.ok for r in again)}/{len(again)} ok")
    await asyncio.to_thread(deploy, cfg, "/local")  # back to 2


async def kill_during_stream(client: httpx.AsyncClient, url: str, body: dict[str, Any],
                             name: str, what: str, pid: int) -> tuple[list[str], float]:
    """Stream `body`; after its first 6 lines SIGKILL `pid`; read the stream to its end.
    (every SSE line, the kill's time.monotonic())"""
    lines: list[str] = []
    async with client.stream("POST", url, json=body) as resp:
        it = resp.aiter_lines()
        async for line in it:
            lines.append(line)
            if len(lines) >= 6:
                break
        log(name, f"SIGKILL {what} (pid {pid}) during a stream")
        killed = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        lines += [ln async for ln in it]
    return lines, killed


async def kill_engine_core(layout: str, cfg: Any, url: str, client: httpx.AsyncClient,
                           plan: Plan, fig: Figures) -> None:
    name = f"engine_{layout}"
    fig.note(name, 0, [])
    holder = "ChatIngress" if layout == "local" else "LLMServer"
    (actor, *_) = replicas(cfg.app_name, holder)
    tree = engine_tree(actor)
    core = tree[0]
    image = fresh_images(1, seed=900)[0]
    body = chat_body(cfg.model.id, image, plan.long_tokens)
    lines, killed = await kill_during_stream(client, url, body, name, "EngineCore", core)
    fig.envelope[layout], code = ended_with_envelope(lines)
    # New requests: 503 with Retry-After while the engine is down, then 200. Nothing else.
    small = chat_body(cfg.model.id, image, 4) | NOT_STREAMED
    statuses: list[int] = []
    retry_after = True
    while time.monotonic() - killed < 300:
        try:
            r = await client.post(url, json=small, timeout=30)
        except httpx.HTTPError as exc:
            fig.note(name, 1, [f"{type(exc).__name__}: {exc}"])
            await asyncio.sleep(1)
            continue
        statuses.append(r.status_code)
        if r.status_code == 200:
            fig.recovery_s[layout] = round(time.monotonic() - killed, 1)
            break
        if r.status_code != 503:
            fig.note(name, 1, [f"HTTP {r.status_code}: {r.text[:200]}"])
        retry_after &= r.headers.get("retry-after") is not None
        await asyncio.sleep(1)
    else:
        fig.recovery_s[layout] = None
        fig.note(name, 1, ["no successful chat within 300 s"])
    fig.refused_with_retry_after[layout] = retry_after and 503 in statuses
    fig.requests += len(statuses) + 1
    left = await asyncio.to_thread(survivors, tree)
    fig.orphans += len(left)
    log(name, f"stream ended with the envelope: {fig.envelope[layout]} (code "
              f"{code!r}); statuses "
              f"{sorted(set(statuses))}; first success {fig.recovery_s.get(layout)} s after "
              f"the kill; old engine processes left: {len(left)}")


def ended_with_envelope(lines: list[str]) -> tuple[bool, str | None]:
    """(the SSE stream ended with Iris's error envelope and [DONE], the error's code)."""
    events = [ln[6:] for ln in lines if ln.startswith("data: ")]
    last_json = json.loads(events[-2]) if len(events) >= 2 else {}
    error = last_json.get("error", {})
    code = error.get("code") if isinstance(error, dict) else None
    ok = (events[-1:] == ["[DONE]"] and isinstance(code, str)
          and set(error) == {"message", "type", "param", "code"})
    return ok, code


async def kill_llm_server(cfg: Any, url: str, client: httpx.AsyncClient, plan: Plan,
                          fig: Figures) -> None:
    """SIGKILL the split layout's only LLMServer replica during a long stream. That stream
    ends with the envelope, code engine_unavailable. Requests sent right after the kill
    (some to the dead replica, before Serve knows) are sent again by the ingress and
    answered by the replacement; the dead replica's engine processes end with it."""
    name = "kill_llm_server"
    (actor, *_) = replicas(cfg.app_name, "LLMServer")
    pid, tree = replica_pid(actor), engine_tree(actor)
    before = {a._actor_id for a in replicas(cfg.app_name, "LLMServer")}
    image = fresh_images(1, seed=950)[0]
    bodies = [encoded(chat_body(cfg.model.id, img, 8)) for img in fresh_images(8, seed=960)]
    lines, killed = await kill_during_stream(
        client, url, chat_body(cfg.model.id, image, plan.long_tokens), name,
        "LLMServer replica", pid)
    enveloped, code = ended_with_envelope(lines)
    fig.envelope[name] = enveloped and code == "engine_unavailable"
    failed, errors = await load(client, url, bodies, plan.concurrency)
    fig.requests += len(bodies) + 1
    fig.note(name, failed, errors)
    answered_s = time.monotonic() - killed
    await until(lambda: running(cfg.app_name, "LLMServer") >= 1 and bool(
        {a._actor_id for a in replicas(cfg.app_name, "LLMServer")} - before), 180,
        "LLMServer replaced")
    fig.replaced[name] = True
    left = await asyncio.to_thread(survivors, tree)
    fig.orphans += len(left)
    log(name, f"stream ended with the envelope: {enveloped} (code {code!r}); "
              f"{len(bodies)} requests sent after the kill, {failed} failed, the last "
              f"answered {answered_s:.0f} s after it; the dead replica's engine processes left: "
              f"{len(left)}")


async def scale_ingress_during_streams(cfg: Any, url: str, client: httpx.AsyncClient,
                                       plan: Plan, fig: Figures) -> None:
    name = "scale_ingress"
    body = encoded(chat_body(cfg.model.id, fresh_images(1, seed=700)[0], plan.long_tokens))
    streams = [asyncio.create_task(stream_chat(client, url, body)) for _ in range(4)]
    await asyncio.sleep(4)  # all four are streaming, on both ingress replicas
    d = cfg.deployments
    smaller = cfg.model_copy(update={"deployments": d.model_copy(update={
        "ingress": d.ingress.model_copy(update={"num_replicas": 1})})})
    log(name, "ChatIngress 2 -> 1 with long streams on both replicas")
    await asyncio.to_thread(deploy, smaller, "/split")
    results = await asyncio.gather(*streams)
    failed = [r.error for r in results if not r.ok]
    fig.requests += len(results)
    fig.note(name, len(failed), failed)
    fig.drained_streams_completed = not failed
    await until(lambda: running(cfg.app_name, "ChatIngress") == 1, 300, "scaled to 1")
    log(name, f"{len(results)} streams, {len(failed)} failed (longest "
              f"{max((r.e2e_s or 0) for r in results):.0f} s)")


async def kill_controller(url: str, bodies: list[bytes], client: httpx.AsyncClient,
                          plan: Plan, fig: Figures) -> None:
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    async def fault() -> None:
        log("controller", "killing the Serve controller (Ray restarts it)")
        ray.kill(ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE),
                 no_restart=False)

    failed, errors = await load(client, url, bodies, plan.concurrency, fault)
    fig.requests += len(bodies)
    fig.note("controller", failed, errors)
    log("controller", f"{len(bodies)} requests, {failed} failed")


async def remove_worker_node(cluster: Any, url: str, bodies: list[bytes],
                             client: httpx.AsyncClient, plan: Plan, fig: Figures) -> None:
    worker = next(iter(cluster.worker_nodes))

    async def fault() -> None:
        log("node", "removing the worker node that holds preprocessor replicas")
        with no_address_file():
            await asyncio.to_thread(cluster.remove_node, worker)

    failed, errors = await load(client, url, bodies, plan.concurrency, fault)
    fig.requests += len(bodies)
    fig.note("node", failed, errors)
    log("node", f"{len(bodies)} requests, {failed} failed")


async def hung_s3(cfg: Any, url: str, s3: S3Server, proxy: HangingS3Proxy,
                  client: httpx.AsyncClient, fig: Figures) -> None:
    fig.note("hung_s3", 0, [])
    png = encode(natural(96, 96, seed=3))
    for i in range(8):
        s3.put(proxy.hung_bucket, f"k{i}.png", png)
    ok_url = s3.put("chaos-healthy", "ok.png", png)
    hung = [asyncio.create_task(client.post(url, json=chat_body(
        cfg.model.id, f"s3://{proxy.hung_bucket}/k{i}.png", 2) | NOT_STREAMED))
        for i in range(8)]
    await until(lambda: proxy.holding == 8, 60, "eight S3 reads hanging")
    t = time.monotonic()
    healthy = await client.post(url, json=chat_body(cfg.model.id, ok_url, 2) | NOT_STREAMED)
    took = time.monotonic() - t
    ended = [t.result().status_code if not t.exception() else repr(t.exception())
             for t in hung if t.done()]
    fig.hung_s3_delayed_healthy = bool(ended) or healthy.status_code != 200
    log("hung_s3", f"the healthy fetch's request took {took:.1f} s; hung requests ended "
                   f"before it: {ended}")
    fig.requests += 1
    if healthy.status_code != 200:
        fig.note("hung_s3", 1, [f"HTTP {healthy.status_code}: {healthy.text[:200]}"])
    proxy.release()
    await asyncio.gather(*hung, return_exceptions=True)
    log("hung_s3", f"8 reads hanging, a 9th from another bucket: HTTP "
                   f"{healthy.status_code} while all 8 still hung: "
                   f"{not fig.hung_s3_delayed_healthy}")


# --------------------------------------------------------------------------- main


async def scenario(cluster: Any, cfgs: dict[str, Any], proxy_port: int, s3: S3Server,
                   proxy: HangingS3Proxy, plan: Plan, fig: Figures) -> None:
    from tests.servers import ImageServer

    base = f"http://127.0.0.1:{proxy_port}"
    urls = {"local": f"{base}/local/v1/chat/completions",
            "split": f"{base}/split/v1/chat/completions"}
    server = ImageServer()
    timeout = httpx.Timeout(300, connect=10)
    headers = {"Authorization": f"Bearer {API_KEY}"}
    limits = httpx.Limits(max_connections=64)
    try:
        async with httpx.AsyncClient(timeout=timeout, headers=headers, limits=limits) as client:
            model = cfgs["local"].model.id
            n = plan.requests
            data_bodies = [encoded(chat_body(model, u, 8)) for u in fresh_images(n, seed=100)]
            await kill_replica_under_load("kill_preprocessor", "chaos-local",
                                          "ImagePreprocessor", urls["local"], data_bodies,
                                          client, plan, fig)
            http_bodies = [encoded(chat_body(model, server.add_bytes(f"/img{i}.jpg", encode(
                natural(320, 240, seed=200 + i), "JPEG"), "image/jpeg"), 8)) for i in range(n)]
            await kill_replica_under_load("kill_fetcher", "chaos-local", "ImageFetcher",
                                          urls["local"], http_bodies, client, plan, fig)
            embed_bodies = [encoded(embed_body(cfgs["local"].encoder.id, u))
                            for u in fresh_images(n, seed=500)]
            await kill_replica_under_load("kill_encoder", "chaos-local", "EmbeddingServer",
                                          f"{base}/local/v1/embeddings", embed_bodies, client,
                                          plan, fig, send=post_embedding, engine=True)
            await scale_preprocessor_down(cfgs["local"], urls["local"], client, plan, fig)
            for layout in LAYOUTS:
                await kill_engine_core(layout, cfgs[layout], urls[layout], client, plan, fig)
            await kill_llm_server(cfgs["split"], urls["split"], client, plan, fig)
            await scale_ingress_during_streams(cfgs["split"], urls["split"], client, plan, fig)
            await kill_controller(urls["local"], [encoded(chat_body(model, u, 8))
                                  for u in fresh_images(n, seed=300)], client, plan, fig)
            await remove_worker_node(cluster, urls["local"], [encoded(chat_body(model, u, 8))
                                     for u in fresh_images(n, seed=400)], client, plan, fig)
            await hung_s3(cfgs["split"], urls["split"], s3, proxy, client, fig)
    finally:
        server.close()


def _terminate(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--short", action="store_true", help="shorter long streams (the test)")
    args = parser.parse_args(argv)
    plan = SHORT if args.short else FULL
    signal.signal(signal.SIGTERM, _terminate)
    os.environ.pop("RAY_ADDRESS", None)

    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    from deployments.run import stop

    fig = Figures()
    s3 = S3Server()
    proxy = HangingS3Proxy(s3.endpoint, "chaos-hung")
    env = {**s3.env, "AWS_ENDPOINT_URL": proxy.endpoint, "PYTHONPATH": str(ROOT)}
    temp_dir = tempfile.mkdtemp(prefix="iris-chaos-", dir="/tmp")
    proxy_port = free_port()
    cluster = None
    engines: set[int] = set()
    ok = False
    try:
        common = {"temp_dir": temp_dir, "include_dashboard": False,
                  "dashboard_agent_listen_port": None}
        with no_address_file():
            cluster = Cluster(initialize_head=True, head_node_args={
                **common, "num_cpus": 8, "resources": {PREP_NODE: 1},
                "object_store_memory": 512 << 20})
            cluster.add_node(**common, num_cpus=2, resources={PREP_NODE: 2},  # type: ignore[arg-type]
                             object_store_memory=256 << 20)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False,
                 runtime_env={"env_vars": env})
        serve.start(proxy_location="HeadOnly",
                    http_options={"host": "127.0.0.1", "port": proxy_port})
        cfgs = configs(proxy_port, plan)
        t = time.monotonic()
        for layout in LAYOUTS:
            deploy(cfgs[layout], f"/{layout}")
        asyncio.run(until(lambda: all(
            str(serve.status().applications.get(c.app_name, None) and
                serve.status().applications[c.app_name].status).endswith("RUNNING")
            for c in cfgs.values()), 600, "both apps running"))
        log("deploy", f"both layouts running in {time.monotonic() - t:.0f} s")
        asyncio.run(scenario(cluster, cfgs, proxy_port, s3, proxy, plan, fig))
        ok = True
    except BaseException as exc:
        log("error", f"{type(exc).__name__}: {exc}")
        fig.errors.append(f"{type(exc).__name__}: {exc}")
        if isinstance(exc, KeyboardInterrupt | SystemExit):
            raise
    finally:
        for child in psutil.Process().children(recursive=True):
            engines.add(child.pid)
        try:
            stop()
        except Exception as exc:
            log("shutdown", f"{type(exc).__name__}: {exc}")
        if cluster is not None:
            with no_address_file():
                cluster.shutdown()
        proxy.close()
        s3.close()
        fig.orphans += len(survivors(list(engines)))
        good = ok and not any(fig.failed.values()) and fig.orphans == 0
        if good:
            shutil.rmtree(temp_dir, ignore_errors=True)
        else:
            log("shutdown", f"Ray logs kept in {temp_dir}")
        summary = {
            "failed_requests": fig.failed, "requests": fig.requests,
            "replaced": fig.replaced, "replaced_after_s": fig.replaced_s,
            "engine_recovery_s": fig.recovery_s,
            "stream_ended_with_envelope": fig.envelope,
            "refused_with_retry_after": fig.refused_with_retry_after,
            "drained_streams_completed": fig.drained_streams_completed,
            "repeat_after_scale_down_ok": fig.repeat_after_scale_down_ok,
            "hung_s3_delayed_healthy": fig.hung_s3_delayed_healthy,
            "orphaned_processes": fig.orphans, "completed": ok,
            "errors": fig.errors[:10],
        }
        log("done", f"wall {time.monotonic() - T0:.0f} s")
        print(json.dumps(summary), flush=True)
    return 0 if good else 1


if __name__ == "__main__":
    os.chdir(ROOT)
    sys.exit(main())
