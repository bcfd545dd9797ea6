"""Side by side on one machine and one model: vLLM's own OpenAI server, Ray Serve LLM, Iris.

Starts each server in turn (never two at once), runs the same workloads against each, and
writes a Markdown table and PNG plots under the results folder.

    .venv/bin/python -m load_tests.compare [--targets vllm,rayllm,iris] [--requests 40]
        [--concurrency 4] [--max-tokens 8] [--iris-env IRIS_IMAGING__FIDELITY=fast]
        [--iris-variant proxy:IRIS_HTTP__DIRECT_INGRESS=false] [--rounds 3] [--interleave]

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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx

from load_tests.cpu import CpuMeter
from load_tests.workload import Result, Workload, run_workload
from tests.images import data_uri, encode, natural
from tests.servers import free_port

ROOT = Path(__file__).resolve().parent.parent
MODEL_DIR = ROOT / ".models" / "demo-vlm"
MODEL_ID = "demo-vlm"
ENGINE_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}


@dataclass
class Server:
    name: str
    command: list[str]
    port: int
    env: dict[str, str] = field(default_factory=dict)
    # Iris answers /v1/models before its engine has loaded; /ready waits for the engine.
    ready_path: str = "/v1/models"
    proc: subprocess.Popen[bytes] | None = None

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
                if httpx.get(url, timeout=5).status_code == 200:
                    return time.monotonic() - t0
            except httpx.HTTPError:
                pass
            time.sleep(2)
        raise TimeoutError(f"{self.name} was not ready after {timeout_s:.0f} s")

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
    """Iris as `make serve` runs it, with `env` on top of the run's IRIS_* settings."""
    return Server(name, [sys.executable, "-m", "deployments.run"], port,
                  {"IRIS_HTTP__PORT": str(port), **iris_env, **env}, "/ready")


def servers(targets: list[str], iris_env: dict[str, str],
            variants: dict[str, dict[str, str]] | None = None) -> list[Server]:
    py = sys.executable
    made: dict[str, Callable[[int], Server]] = {
        "vllm": lambda p: Server("vllm", [
            py, "-m", "vllm.entrypoints.openai.api_server", "--model", str(MODEL_DIR),
            "--served-model-name", MODEL_ID, "--host", "127.0.0.1", "--port", str(p),
            "--max-model-len", "4096", "--dtype", "float32", "--enforce-eager",
            "--max-num-seqs", "16", "--disable-log-stats"], p),
        "rayllm": lambda p: Server("rayllm", [
            py, "-m", "load_tests.peers.rayllm_app", "--model", str(MODEL_DIR),
            "--model-id", MODEL_ID, "--port", str(p)], p),
    }
    # Iris, and each variant of it: the same server with more settings on top.
    for name, env in {"iris": {}, **(variants or {})}.items():
        made[name] = functools.partial(iris_server, name, env, iris_env)
    return [made[t](free_port()) for t in targets]


def workloads(requests: int, concurrency: int, max_tokens: int) -> list[Workload]:
    print(">> making test images (640x480 and 4000x3000 JPEG)", flush=True)
    small = data_uri(encode(natural(640, 480, seed=1), "JPEG", quality=90), "image/jpeg")
    large = data_uri(encode(natural(4000, 3000, seed=2), "JPEG", quality=90), "image/jpeg")
    return [
        Workload("small-jpeg-data-uri", (small,), concurrency, requests, max_tokens),
        Workload("large-jpeg-data-uri", (large,), concurrency, requests, max_tokens),
        Workload("small-jpeg-data-uri-c1", (small,), 1, max(10, requests // 4), max_tokens),
        Workload("large-jpeg-data-uri-c1", (large,), 1, max(10, requests // 4), max_tokens),
    ]


T = TypeVar("T")


def rotated(targets: list[T], round_: int) -> list[T]:
    """Round k starts with the k-th server, so none always runs first (or last)."""
    k = round_ % max(1, len(targets))
    return targets[k:] + targets[:k]


MEDIANS = ("req_per_s", "ttft_p50_ms", "ttft_p99_ms", "e2e_p50_ms", "e2e_mean_ms")


def combined(results: list[Result]) -> dict[tuple[str, str], dict[str, Any]]:
    """Per (workload, target): each number's median over the rounds, errors summed, and
    the range of req/s (one round: its own summary)."""
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
        out[key] = s
    return out


def markdown(results: list[Result], targets: list[str]) -> str:
    by = combined(results)
    names = list(dict.fromkeys(r.workload for r in results))
    lines = ["| workload | " + " | ".join(targets) + " | iris / vllm req/s |",
             "|---|" + "---|" * (len(targets) + 1)]
    for w in names:
        cells = []
        for t in targets:
            s = by.get((w, t))
            spread = ""
            if s is not None and s["rounds"] > 1:
                spread = " ({}-{})".format(*s["req_per_s_range"])
            cells.append("n/a" if s is None else
                         f"{s['req_per_s']} req/s{spread}, TTFT p50 {s['ttft_p50_ms']} ms, "
                         f"p99 {s['ttft_p99_ms']} ms" + (f", {s['errors']} errors"
                                                         if s["errors"] else ""))
        ratio = ""
        if (w, "iris") in by and (w, "vllm") in by and by[(w, "vllm")]["req_per_s"]:
            ratio = f"{by[(w, 'iris')]['req_per_s'] / by[(w, 'vllm')]['req_per_s']:.2f}x"
        lines.append(f"| {w} | " + " | ".join(cells) + f" | {ratio} |")
    return "\n".join(lines) + "\n"


def cpu_markdown(cpu: list[dict[str, Any]]) -> str:
    """Per-process CPU ms per request: where each server's time goes."""
    lines = ["| workload | server | total CPU ms/request | by process (ms/request) |",
             "|---|---|---|---|"]
    rounds = any(row.get("round", 1) > 1 for row in cpu)
    for row in cpu:
        top = ", ".join(f"{k} {v}" for k, v in list(row["cpu_ms"].items())[:7])
        server = f"{row['target']} (round {row['round']})" if rounds else row["target"]
        lines.append(f"| {row['workload']} | {server} | "
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
        fig, ax = plt.subplots(figsize=(9, 4))
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


def measure(server: Server, loads: list[Workload], warmup: int, round_: int,
            results: list[Result], cpu: list[dict[str, Any]]) -> None:
    """Warm up, then run each workload once against a ready server, with its CPU."""
    for w in loads:
        warm = Workload(w.name, w.image_urls, w.concurrency, warmup, w.max_tokens)
        asyncio.run(run_workload(server.base_url, MODEL_ID, warm, server.name))
        assert server.proc is not None
        meter = CpuMeter(server.proc.pid)
        before = meter.snapshot()
        r = asyncio.run(run_workload(server.base_url, MODEL_ID, w, server.name))
        used = CpuMeter.per_request_ms(before, meter.snapshot(), w.requests)
        results.append(r)
        cpu.append({"workload": w.name, "target": server.name, "round": round_ + 1,
                    "cpu_ms": used})
        print(f">> [{server.name}] {json.dumps(r.summary())}", flush=True)
        print(f"   CPU ms/request: {json.dumps(dict(list(used.items())[:7]))}", flush=True)
        for e in r.errors[:3]:
            print(f"   error: {e}", flush=True)


def run_in_turn(targets: list[str], iris_env: dict[str, str],
                variants: dict[str, dict[str, str]], loads: list[Workload],
                args: argparse.Namespace, out: Path, results: list[Result],
                cpu: list[dict[str, Any]]) -> None:
    """One server at a time: start it, run every workload, stop it; round after round."""
    plan = [(k, t) for k in range(args.rounds) for t in rotated(targets, k)]
    for k, server in ((k, servers([t], iris_env, variants)[0]) for k, t in plan):
        log = out / (f"{server.name}.log" if args.rounds == 1 else f"{server.name}-{k + 1}.log")
        print(f">> [{server.name}] round {k + 1}/{args.rounds}: starting on port {server.port} "
              f"(log: {log})", flush=True)
        server.start(log)
        try:
            print(f">> [{server.name}] ready after {server.wait_ready():.0f} s", flush=True)
            measure(server, loads, args.warmup, k, results, cpu)
        except Exception as exc:
            print(f">> [{server.name}] failed: {exc}", flush=True)
        finally:
            print(f">> [{server.name}] stopping", flush=True)
            server.stop()


def idle_cpu(started: list[Server], seconds: float = 10) -> dict[str, float]:
    """CPU ms per second each server uses with no traffic: what it takes from the others."""
    meters = {s.name: CpuMeter(s.proc.pid) for s in started if s.proc is not None}
    before = {name: m.snapshot() for name, m in meters.items()}
    time.sleep(seconds)
    return {name: round(sum(CpuMeter.per_request_ms(before[name], m.snapshot(),
                                                    int(seconds)).values()), 1)
            for name, m in meters.items()}


def run_interleaved(targets: list[str], iris_env: dict[str, str],
                    variants: dict[str, dict[str, str]], loads: list[Workload],
                    args: argparse.Namespace, out: Path, results: list[Result],
                    cpu: list[dict[str, Any]]) -> dict[str, float]:
    """All servers up at once, each workload run against one after another, round after
    round: the machine's drift hits every server alike. Returns their idle CPU (ms/s)."""
    started: list[Server] = []
    try:
        for target in targets:
            # Its port is picked only now: servers already up hold ports of their own.
            server = servers([target], iris_env, variants)[0]
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
                    measure(server, [w], args.warmup, k, results, cpu)
        return idle
    finally:
        for server in started:
            print(f">> [{server.name}] stopping", flush=True)
            server.stop()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--targets", default="vllm,rayllm,iris")
    p.add_argument("--requests", type=int, default=40)
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
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()

    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    iris_env = dict(kv.split("=", 1) for kv in args.iris_env)
    variants = dict(parse_variant(v) for v in args.iris_variant)
    targets += list(variants)
    out = args.out or ROOT / "load_tests" / "results" / time.strftime("compare-%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    loads = workloads(args.requests, args.concurrency, args.max_tokens)
    results: list[Result] = []
    cpu: list[dict[str, Any]] = []
    if args.interleave:
        idle = run_interleaved(targets, iris_env, variants, loads, args, out, results, cpu)
    else:
        idle = {}
        run_in_turn(targets, iris_env, variants, loads, args, out, results, cpu)
    table = markdown(results, targets)
    note = (f"Same machine, model {MODEL_ID}, concurrency {args.concurrency} (and 1 for -c1), "
            f"{args.requests} requests, {args.max_tokens} output tokens (ignore_eos), the same "
            f"image every request, sent as a data: URI. Iris env: {iris_env or 'defaults'}"
            + "".join(f"; {n}: {e}" for n, e in variants.items()) + "."
            + (f" Medians over {args.rounds} rounds, req/s range in brackets; each round "
               "started with a different server." if args.rounds > 1 else "")
            + (" Interleaved: all servers ran at once and took turns per workload; with no "
               "traffic they used, in CPU ms per second, "
               + ", ".join(f"{n} {ms}" for n, ms in idle.items()) + "." if idle else "")
            + "\n\n")
    cpu_note = ("\n## Where the CPU goes\n\nCPU time of each server's processes during "
                "the measured requests, per request. vLLM's model worker busy-polls for work, "
                "so its figure includes spinning and grows into whatever CPU is idle.\n\n")
    (out / "results.md").write_text("# Iris vs vLLM vs Ray Serve LLM\n\n" + note + table
                                    + cpu_note + cpu_markdown(cpu))
    (out / "results.json").write_text(json.dumps(
        {"results": [r.summary() for r in results],
         "combined": list(combined(results).values()),
         "cpu_ms_per_request": cpu}, indent=2))
    plots = plot(results, targets, out)
    print("\n" + table, flush=True)
    print(f">> wrote {out / 'results.md'} and {', '.join(p.name for p in plots)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
