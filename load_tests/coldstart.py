"""Cold start from zero, side by side: vLLM's own server starting the demo model, and Iris's
engine deployment (LLMServer) scaling from zero replicas for a request, phase by phase.

    .venv/bin/python -m load_tests.coldstart [--rounds 2]

vLLM: from launching `vllm.entrypoints.openai.api_server` to the first token of a streaming
chat request with an image, sent as soon as the server answers /v1/models.
Iris: `make serve`'s app in the split layout (the engine in its own deployment, as clusters
run it) with LLMServer at min_replicas 0 and no encoder; once every other deployment is up
and idle, the same request is sent; the clock runs from sending it to its first token.

Phases come from the logs: Serve's controller and replica logs (millisecond timestamps) and
vLLM's own lines (second resolution), the same lines in both servers:
  scheduled       (Iris) Serve's controller adds the replica: the autoscaler's decision
  process up      (Iris) the replica's process started and imported the deployment module;
                  (vLLM) the API server process's first log line (its imports)
  engine core up  the EngineCore process's first line (spawned: imports torch and vLLM again)
  worker up       the model worker's first line (spawned by the EngineCore: imports again)
  weights loaded  vLLM's "Loading weights took"
  engine ready    vLLM's "init engine (profile, create kv cache, warmup model) took"
  serving         (Iris) the replica finished initialising; (vLLM) /v1/models answers
  first token     the client's first content chunk
Each phase's time is from the previous mark found. Rounds alternate which server goes first.
The last line printed is one JSON object: per server the median total over the rounds, and
iris_over_vllm.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import glob
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from load_tests.compare import MODEL_ID, ROOT, Server, vllm_server
from load_tests.workload import Images, chat_body, encoded, stream_chat
from tests.servers import free_port

# vLLM's log lines: "INFO 12-01 19:04:12 [core.py:93] message", maybe after "(EngineCore pid=N) ".
VLLM_LINE = re.compile(r"(?:\((\w[\w-]*) pid=\d+\) )?(?:INFO|WARNING|DEBUG) "
                       r"(\d\d-\d\d \d\d:\d\d:\d\d) \[([\w.]+):\d+\] (.*)")
# Serve's: "INFO 2026-12-01 19:03:46,094 controller 123 -- message".
SERVE_LINE = re.compile(r"^(?:INFO|WARNING) (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) (.*)$")
ENGINE_MARKS = (  # (name, process prefix or None for any, needle)
    ("engine core up", "EngineCore", ""),
    ("worker up", "Worker", ""),
    ("weights loaded", None, "Loading weights took"),
    ("engine ready", None, "init engine (profile, create kv cache, warmup model) took"),
)


def vllm_stamp(text: str) -> float:
    year = dt.date.today().year
    return dt.datetime.strptime(f"{year}-{text}", "%Y-%m-%d %H:%M:%S").timestamp()


def serve_stamp(text: str) -> float:
    return dt.datetime.strptime(text, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def engine_marks(lines: list[str], since: float) -> dict[str, float]:
    """The first time of each ENGINE_MARKS line at or after `since` (vLLM's second-resolution
    stamps: a line within the second before `since` counts too)."""
    found: dict[str, float] = {}
    for line in lines:
        m = VLLM_LINE.search(line)
        if not m:
            continue
        proc, stamp, _, message = m.groups()
        t = vllm_stamp(stamp)
        if t < since - 1:
            continue
        proc = "Worker" if proc and "Worker" in proc else proc
        for name, want, needle in ENGINE_MARKS:
            if name not in found and (want is None or proc == want) and needle in message:
                found[name] = t
    return found


def phases(marks: list[tuple[str, float | None]], t0: float) -> list[dict[str, Any]]:
    """Each mark's time since t0 and since the previous mark found."""
    out: list[dict[str, Any]] = []
    prev = t0
    for name, t in marks:
        if t is None:
            out.append({"phase": name, "at_s": None, "took_s": None})
            continue
        out.append({"phase": name, "at_s": round(t - t0, 1), "took_s": round(t - prev, 1)})
        prev = t
    return out


def first_token(base: str, body: bytes, timeout_s: float = 900) -> float:
    """Seconds to the first content of one streaming chat request (raises if it fails)."""
    async def go() -> float:
        async with httpx.AsyncClient(timeout=timeout_s) as client:
            res = await stream_chat(client, f"{base}/chat/completions", body)
        if not res.ok or res.first_token_s is None:
            raise RuntimeError(f"the cold request failed: {res.error}")
        return res.first_token_s

    return asyncio.run(go())


def run_vllm(out: Path, body: bytes, k: int) -> dict[str, Any]:
    server = vllm_server(free_port())
    log = out / f"vllm-{k}.log"
    t0 = time.time()
    server.start(log)
    try:
        ready = t0 + server.wait_ready()
        token = time.time() + first_token(server.base_url, body)
    finally:
        server.stop()
    lines = log.read_text(errors="replace").splitlines()
    api_up = next((vllm_stamp(m.group(2)) for m in map(VLLM_LINE.search, lines) if m), None)
    found = engine_marks(lines, t0)
    rows = phases([("process up", api_up), *((n, found.get(n)) for n, *_ in ENGINE_MARKS),
                   ("serving", ready), ("first token", token)], t0)
    return {"server": "vllm", "total_s": round(token - t0, 1), "phases": rows}


def iris_config_file(out: Path) -> Path:
    """make serve's config, split layout, LLMServer from zero, no encoder."""
    cfg = yaml.safe_load((ROOT / "infra" / "local.yaml").read_text())
    cfg.pop("encoder", None)
    deployments = cfg.setdefault("deployments", {})
    deployments.pop("encoder", None)
    deployments["engine_in_ingress"] = False
    llm = {k: v for k, v in deployments.get("llm", {}).items() if k != "num_replicas"}
    # Serve scales up from zero at once, whatever upscale_delay_s says; min and initial 0.
    llm["autoscaling_config"] = {"min_replicas": 0, "initial_replicas": 0, "max_replicas": 1,
                                 "target_ongoing_requests": 2}
    deployments["llm"] = llm
    path = out / "iris-coldstart.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_iris(out: Path, body: bytes, k: int, settle_s: float) -> dict[str, Any]:
    port = free_port()
    server = Server("iris", [sys.executable, "-m", "deployments.run"], port,
                    {"IRIS_CONFIG": str(iris_config_file(out)), "IRIS_HTTP__PORT": str(port),
                     "IRIS_METRICS_PORT": str(free_port())})
    log = out / f"iris-{k}.log"
    server.start(log)
    try:
        server.wait_ready()  # /v1/models: the ingress (not /ready: it would wake the engine)
        time.sleep(settle_s)  # the other deployments finish starting and go idle
        session = Path(os.path.realpath("/tmp/ray/session_latest"))
        t0 = time.time()
        token = t0 + first_token(server.base_url, body)
    finally:
        server.stop()
    logs = session / "logs"
    scheduled = up = serving = None
    for path in glob.glob(str(logs / "serve" / "controller_*.log")):
        for line in Path(path).read_text(errors="replace").splitlines():
            m = SERVE_LINE.match(line)
            if m and scheduled is None and "LLMServer" in m.group(2) and (
                    "Adding 1 replica" in m.group(2) or "Starting Replica" in m.group(2)):
                t = serve_stamp(m.group(1))
                scheduled = t if t >= t0 else None
    for path in glob.glob(str(logs / "serve" / "replica_*LLMServer*.log")):
        for line in Path(path).read_text(errors="replace").splitlines():
            m = SERVE_LINE.match(line)
            if m and "Started initializing replica" in m.group(2):
                up = up or serve_stamp(m.group(1))
            if m and "Finished initializing replica" in m.group(2):
                serving = serving or serve_stamp(m.group(1))
    lines = [line for path in [*glob.glob(str(logs / "worker-*")), str(log)]
             for line in Path(path).read_text(errors="replace").splitlines()]
    found = engine_marks(lines, t0)
    rows = phases([("scheduled", scheduled), ("process up", up),
                   *((n, found.get(n)) for n, *_ in ENGINE_MARKS),
                   ("serving", serving), ("first token", token)], t0)
    return {"server": "iris", "total_s": round(token - t0, 1), "phases": rows,
            "ray_logs": str(logs)}


def table(run: dict[str, Any]) -> str:
    rows = [f"  {p['phase']:<15} " + ("not found" if p["at_s"] is None else
                                      f"at {p['at_s']:6.1f} s  (+{p['took_s']:5.1f} s)")
            for p in run["phases"]]
    return f"{run['server']}: {run['total_s']} s to the first token\n" + "\n".join(rows)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--settle", type=float, default=30.0,
                   help="seconds Iris's other deployments get after /v1/models answers")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="iris-coldstart-"))
    out.mkdir(parents=True, exist_ok=True)
    images = Images()
    runs: list[dict[str, Any]] = []
    for k in range(args.rounds):
        for name in (("vllm", "iris") if k % 2 == 0 else ("iris", "vllm")):
            # A fresh image each time: nothing cached helps either server.
            body = encoded(chat_body(MODEL_ID, images.data_uri(640, 480), 8))
            print(f">> round {k + 1}/{args.rounds}: {name} (logs in {out})", flush=True)
            run = (run_vllm(out, body, k) if name == "vllm"
                   else run_iris(out, body, k, args.settle))
            runs.append(run)
            print(table(run), flush=True)
    totals = {s: statistics.median(r["total_s"] for r in runs if r["server"] == s)
              for s in ("vllm", "iris")}
    print(json.dumps({"vllm_cold_s": totals["vllm"], "iris_cold_s": totals["iris"],
                      "iris_over_vllm": round(totals["iris"] / totals["vllm"], 2),
                      "runs": runs}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
