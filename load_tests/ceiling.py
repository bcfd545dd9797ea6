"""The most any server built on vLLM's engine can do on this machine, against vLLM's own server.

    .venv/bin/python -m load_tests.ceiling [--requests 96] [--rounds 2] [--out DIR]
        [--workloads fresh-small,fresh-12mp,chat-4turns,embed-fresh]

`engine-alone` is Iris's engine path with everything in front of it free: one process holding
vLLM's engine exactly as Iris's engine replica does (`VllmChatEngine`, `VllmEncoder`: vLLM's
own chat and embedding serving code), fed the workload's images already decoded and resized
to the model's size (off the clock, by Iris's own `prepare_image`), each with its content
hash as vLLM's cache key, from an asyncio loop in the same process: no HTTP, no JSON, no
fetch, no decode, no Ray, no second process. The engine places its worker as vLLM's own
server does (vLLM's default on this machine: one OpenMP thread bound to the first core, the
other core left to everything else); `--engine-env VLLM_CPU_OMP_THREADS_BIND=0,1` tries
another placement. A server has to do all of the skipped work on the same two cores, so its
req/s stays below this one's.

Each round runs vLLM's own server (the chat model, and its pooling server for embeddings)
and the engine alone, one at a time, on the same workloads as `load_tests.compare` (every
image distinct in the whole run), each round starting with the other. The report gives, per
workload, `engine-alone / vLLM's server`: the highest Iris / vLLM ratio that the engine
leaves possible on this machine, next to issue 15's and 18's targets.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from load_tests import compare
from load_tests.compare import ROOT, Bench, rotated, workloads
from load_tests.cpu import CpuMeter
from load_tests.workload import (
    DONE,
    Images,
    Result,
    StreamResult,
    Workload,
    chat_body,
    delta_text,
    question_list,
    sse_chunk,
)

CEILING = "engine-alone"
# The issues' targets (Iris / vLLM's server, req/s): 15 for chat, 18 for embeddings.
TARGETS: dict[str, tuple[tuple[float, str], ...]] = {
    "fresh-small": ((1.1, ""),), "fresh-12mp": ((1.2, "exact"), (2.5, "fast")),
    "chat-4turns": ((1.3, ""),), "embed-fresh": ((1.0, ""),)}
CHOICES = ("fresh-small", "fresh-12mp", "chat-4turns", "fresh-small-c1", "fresh-12mp-c1",
           "embed-fresh")


def peer_of(w: Workload) -> str:
    return "vllm-pooling" if w.route == "embeddings" else "vllm"


# --- the engine alone (child process) --------------------------------------------------------


def sse_pieces(text: str) -> tuple[str, dict[str, Any] | None, bool]:
    """(content, usage, done) of one or more SSE frames of vLLM's chat stream."""
    content, usage, done = "", None, False
    for line in text.splitlines():
        chunk = sse_chunk(line)
        if chunk == DONE:
            done = True
        elif isinstance(chunk, dict):
            if "error" in chunk:
                raise RuntimeError(chunk["error"].get("message"))
            usage = chunk.get("usage") or usage
            content += delta_text(chunk)
    return content, usage, done


class EngineAlone:
    """Iris's engine objects in this process, and the workloads run straight at them."""

    def __init__(self, kind: str) -> None:
        from deployments.app import with_processor
        from handlers.config_load import load_config
        from handlers.resize_rules import rule_from

        # infra/local.yaml, as `make serve` runs it; no Ray here, so no Ray metrics export.
        cfg = with_processor(load_config(environ={}, engine={"metrics": False}))
        self.cfg, self.kind = cfg, kind
        if kind == "chat":
            im = cfg.imaging
            self.rule = rule_from(cfg.model.processor or {}, default_detail=im.default_detail,
                                  low_max_pixels=im.low_detail_max_pixels,
                                  min_pixels=im.min_pixels, max_pixels=im.max_pixels)
        else:
            assert cfg.encoder is not None
            self.rule = rule_from(cfg.encoder.processor or {})
        self.engine: Any = None

    async def start(self) -> None:
        from handlers.encoder import VllmEncoder
        from handlers.engine import VllmChatEngine

        if self.kind == "chat":
            os.environ.update(self.cfg.engine.env)
            self.engine = await VllmChatEngine.start(self.cfg)
        else:
            assert self.cfg.encoder is not None
            os.environ.update(self.cfg.encoder.env)
            self.engine = await VllmEncoder.start(self.cfg.encoder)

    def pixels(self, images: Images, size: tuple[int, int]) -> tuple[Any, str]:
        """A new image at the model's size and its content hash: what Iris's preprocessor
        hands the engine, made before the clock."""
        from handlers.imaging import prepare_image

        data = images.jpeg(*size)
        return prepare_image(data, self.rule).array, hashlib.sha256(data).hexdigest()

    async def chat(self, messages: list[dict[str, Any]], image: tuple[Any, str],
                   max_tokens: int) -> StreamResult:
        body = chat_body(compare.MODEL_ID, "prepared", max_tokens)
        body["messages"] = messages
        t0 = time.monotonic()
        res = StreamResult(ok=False)
        try:
            async for event in self.engine.chat(body, [image]):
                piece, usage, done = sse_pieces(event.text)
                if piece and res.first_token_s is None:
                    res.first_token_s = time.monotonic() - t0
                res.text += piece
                res.usage = usage or res.usage
                res.ok = res.ok or done
        except Exception as exc:
            res.error = f"{type(exc).__name__}: {exc}"[:300]
            res.ok = False
            return res
        res.e2e_s = time.monotonic() - t0
        if not res.ok:
            res.error = "stream ended without [DONE]"
        return res

    async def embed(self, image: tuple[Any, str]) -> StreamResult:
        t0 = time.monotonic()
        try:
            vectors, tokens = await self.engine.embed_images([image], None)
        except Exception as exc:
            return StreamResult(ok=False, error=f"{type(exc).__name__}: {exc}"[:300])
        e2e = time.monotonic() - t0
        return StreamResult(ok=bool(vectors and vectors[0]), first_token_s=e2e, e2e_s=e2e,
                            usage={"prompt_tokens": tokens})

    def inputs(self, w: Workload, images: Images, requests: int) -> list[tuple[Any, str]]:
        """One image per request (per conversation), at the model's size."""
        assert w.size is not None
        return [self.pixels(images, w.size) for _ in range(-(-requests // w.turns))]

    async def run(self, w: Workload, inputs: list[tuple[Any, str]], name: str) -> Result:
        questions = question_list(w.turns)
        result = Result(w.name, name)
        sem = asyncio.Semaphore(w.concurrency)

        async def one(image: tuple[Any, str]) -> None:
            async with sem:
                if w.route == "embeddings":
                    result.record(await self.embed(image))
                    return
                first = {"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": "prepared"}},
                    {"type": "text", "text": questions[0]}]}
                messages: list[dict[str, Any]] = [first]
                for turn in range(1, w.turns + 1):
                    res = await self.chat(messages, image, w.max_tokens)
                    result.record(res, turn if w.turns > 1 else 0)
                    if not res.ok or turn == w.turns:
                        return
                    messages = [*messages, {"role": "assistant", "content": res.text},
                                {"role": "user", "content": questions[turn]}]

        t0 = time.perf_counter()
        await asyncio.gather(*(one(image) for image in inputs))
        result.wall_s = time.perf_counter() - t0
        return result


async def child(args: argparse.Namespace) -> list[dict[str, Any]]:
    loads = [w for w in workloads(args.requests, args.concurrency, args.max_tokens,
                                  args.workloads.split(","))
             if (w.route == "embeddings") == (args.child == "encoder")]
    alone = EngineAlone(args.child)
    t0 = time.monotonic()
    await alone.start()
    print(f">> [{CEILING}] {args.child} engine ready after {time.monotonic() - t0:.0f} s",
          flush=True)
    images = Images(args.seed)
    meter = CpuMeter(os.getpid())
    rows = []
    for w in loads:
        if args.warmup:
            await alone.run(w, alone.inputs(w, images, args.warmup), "warm-up")
        inputs = alone.inputs(w, images, w.requests)
        await asyncio.sleep(2)  # the worker's busy-poll after the warm-up winds down
        before = meter.snapshot()
        r = await alone.run(w, inputs, CEILING)
        used = CpuMeter.per_request_ms(before, meter.snapshot(), w.requests)
        print(f">> [{CEILING}] {json.dumps(r.summary())}", flush=True)
        print(f"   CPU ms/request: {json.dumps(used)}", flush=True)
        for e in r.errors[:3]:
            print(f"   error: {e}", flush=True)
        rows.append({"result": asdict(r), "cpu_ms": used})
    alone.engine.shutdown()
    return rows


# --- the run (parent) ------------------------------------------------------------------------


def engine_alone(loads: list[Workload], kind: str, args: argparse.Namespace, seed: int,
                 out: Path, round_: int, bench: Bench) -> None:
    """The engine alone on `loads`, in a process of its own (vLLM's engine processes end
    with it), its results added to `bench`."""
    if not loads:
        return
    rows_file = out / f"{CEILING}-{kind}-{round_ + 1}.json"
    log = out / f"{CEILING}-{kind}-{round_ + 1}.log"
    cmd = [sys.executable, "-m", "load_tests.ceiling", "--child", kind,
           "--child-out", str(rows_file), "--seed", str(seed),
           "--workloads", ",".join(w.name for w in loads), "--requests", str(args.requests),
           "--concurrency", str(args.concurrency), "--max-tokens", str(args.max_tokens),
           "--warmup", str(args.warmup)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("IRIS_")}
    env.update(kv.split("=", 1) for kv in args.engine_env)
    print(f">> [{CEILING}] round {round_ + 1}/{args.rounds}: {kind} engine (log: {log})",
          flush=True)
    with log.open("wb") as f:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                              check=False, timeout=3600)
    # The child's own progress and results lines, as compare prints a server's.
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith((">> [", "   ")):
            print(line, flush=True)
    if proc.returncode != 0 or not rows_file.exists():
        print(f">> [{CEILING}] {kind} failed (exit {proc.returncode}); see {log}", flush=True)
        return
    for row in json.loads(rows_file.read_text()):
        raw = row["result"]
        raw["ttft_by_turn"] = {int(k): v for k, v in raw["ttft_by_turn"].items()}
        bench.results.append(Result(**raw))
        bench.cpu.append({"workload": raw["workload"], "target": CEILING,
                          "round": round_ + 1, "cpu_ms": row["cpu_ms"]})


def vllm_side(loads: list[Workload], out: Path, round_: int, args: argparse.Namespace,
              bench: Bench) -> None:
    """vLLM's own servers (chat, pooling) one after the other, each on its workloads."""
    for peer in dict.fromkeys(peer_of(w) for w in loads):
        compare.run_server(compare.servers([peer], {})[0], loads, round_, args.rounds, out, bench)


Combined = dict[tuple[str, str], dict[str, Any]]


def ratio(by: Combined, w: Workload) -> float | None:
    """engine alone / vLLM's server, req/s medians; None if either is missing."""
    peer, alone = by.get((w.name, peer_of(w))), by.get((w.name, CEILING))
    if not peer or not alone or not peer["req_per_s"]:
        return None
    return float(alone["req_per_s"]) / float(peer["req_per_s"])


def pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def report(by: Combined, loads: list[Workload]) -> str:
    """Per workload (from compare.combined's rows): vLLM's server, the engine alone, the ratio
    between them (the most Iris / vLLM can be here) next to the issue's targets, and what
    everything in front of the engine (HTTP, JSON, fetch, decode, resize, hops) costs vLLM's
    server in req/s against what it may cost a server that meets each target. Where the
    engine alone is the slower, it bounds nothing: its requests reached the engine in another
    rhythm than a server's (conversations in lockstep), which is no ceiling."""
    lines = ["| workload | vLLM's server req/s | engine alone req/s | engine alone / vLLM: "
             "the highest reachable ratio | target | reachable here | the front costs "
             "vLLM's server | the front may cost, to meet the target |",
             "|---|---|---|---|---|---|---|---|"]
    for w in loads:
        r, targets = ratio(by, w), TARGETS.get(w.name, ())
        cells = [
            "n/a" if s is None else
            f"{s['req_per_s']} ({s['req_per_s_range'][0]}-{s['req_per_s_range'][1]}), "
            f"TTFT p50 {s['ttft_p50_ms']} ms"
            for s in (by.get((w.name, peer_of(w))), by.get((w.name, CEILING)))]
        wanted = ", ".join(f"{t}x" + (f" ({how})" if how else "") for t, how in targets)
        verdict = budget = ""
        if r is not None and r < 1:
            verdict = "no bound: the engine alone was slower"
        elif r is not None and targets:
            verdict = ", ".join("yes" if r >= t else "**no**" for t, _ in targets)
            budget = ", ".join(pct(max(0.0, 1 - t / r)) for t, _ in targets)
        front = "n/a" if r is None else pct(1 - 1 / r)
        lines.append(f"| {w.name} | {cells[0]} | {cells[1]} | "
                     f"{'n/a' if r is None else f'{r:.2f}x'} | {wanted} | {verdict} | "
                     f"{front} | {budget} |")
    return "\n".join(lines) + "\n"


def rerender(out: Path, loads: list[Workload]) -> str:
    """The report again from a finished run's results.json (its combined rows)."""
    rows = json.loads((out / "results.json").read_text())["combined"]
    return report({(r["workload"], r["target"]): r for r in rows}, loads)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--workloads", default="fresh-small,fresh-12mp,chat-4turns,embed-fresh",
                   help=f"comma-separated, of: {', '.join(CHOICES)}")
    p.add_argument("--requests", type=int, default=96)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--engine-env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment of the engine alone only (not of vLLM's server)")
    p.add_argument("--report", type=Path, metavar="DIR",
                   help="print the table of a finished run (its results.json) and stop")
    p.add_argument("--child", choices=("chat", "encoder"), help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    args = p.parse_args()
    names = [n.strip() for n in args.workloads.split(",") if n.strip()]
    if unknown := set(names) - set(CHOICES):
        p.error(f"unknown workloads {sorted(unknown)}; known: {', '.join(CHOICES)}")
    if args.report:
        print(rerender(args.report, workloads(args.requests, args.concurrency,
                                               args.max_tokens, names)), end="")
        return 0
    if args.child:
        Path(args.child_out).write_text(json.dumps(asyncio.run(child(args))))
        return 0

    loads = workloads(args.requests, args.concurrency, args.max_tokens, names)
    out = args.out or ROOT / "load_tests" / "results" / time.strftime("ceiling-%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    bench = Bench(Images(args.seed), args.warmup)
    print(f">> images: salt {bench.images.salt}", flush=True)
    chat = [w for w in loads if w.route == "chat"]
    embed = [w for w in loads if w.route == "embeddings"]
    for k in range(args.rounds):
        for side in rotated(["vllm", CEILING], k):
            if side == "vllm":
                vllm_side(loads, out, k, args, bench)
                continue
            # Distinct images from the server's: another salt for every child.
            seed = (bench.images.salt + 104729 * (k + 1)) % 2**32
            engine_alone(chat, "chat", args, seed, out, k, bench)
            engine_alone(embed, "encoder", args, seed + 1, out, k, bench)
    by = compare.combined(bench.results)
    table = report(by, loads)
    note = (f"Medians over {args.rounds} rounds (req/s range in brackets), {args.max_tokens} "
            "output tokens, c as in load_tests.compare. Engine alone: Iris's engine objects "
            "fed pre-resized pixels in-process (see load_tests/ceiling.py); its environment: "
            + (", ".join(args.engine_env) or "as vLLM's server's") + ".\n\n"
            + "".join(f"- {compare.describe(w)}\n" for w in loads) + "\n")
    (out / "results.md").write_text(
        "# The engine alone vs vLLM's server\n\n" + note + table
        + "\n## Where the CPU goes\n\n" + compare.cpu_markdown(bench.cpu))
    (out / "results.json").write_text(json.dumps(
        {"results": [r.summary() for r in bench.results],
         "combined": list(compare.combined(bench.results).values()),
         "cpu_ms_per_request": bench.cpu,
         "ratios": {w.name: ratio(by, w) for w in loads}}, indent=2))
    print("\n" + table, flush=True)
    print(f">> wrote {out / 'results.md'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
