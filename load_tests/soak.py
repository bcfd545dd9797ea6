"""Soak: N requests with unique images; every replica's RSS is sampled over time and must
level off (no leak per image).

    .venv/bin/python -m load_tests.soak [--requests 2000] [--concurrency 4]
        [--base-url http://127.0.0.1:8000/v1]   # default: start Iris here

Prints progress, a per-replica RSS table (start, middle, end, and growth over the second
half), writes rss.csv under the results folder, and exits 1 if a replica kept growing.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil

from load_tests.compare import ROOT, Server, free_port, servers
from load_tests.cpu import process_label
from load_tests.workload import Result, one_request
from load_tests.workload import chat_body as body_for
from tests.images import data_uri, encode, pattern


def replica_processes() -> dict[str, psutil.Process]:
    """Ray names replica worker processes `ray::ServeReplica:<app>:<deployment>`."""
    out: dict[str, psutil.Process] = {}
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmdline = proc.info.get("cmdline") or []
        if cmdline and cmdline[0].startswith("ray::ServeReplica:"):
            out[f"{process_label(cmdline, '')}#{proc.pid}"] = proc
    return out


class RssSampler(threading.Thread):
    def __init__(self, every_s: float) -> None:
        super().__init__(daemon=True)
        self.every_s = every_s
        self.rows: list[tuple[float, str, float]] = []
        self.done = threading.Event()
        self.progress = 0

    def run(self) -> None:
        t0 = time.monotonic()
        while not self.done.is_set():
            for name, proc in replica_processes().items():
                try:
                    rss = proc.memory_info().rss / 2**20
                except psutil.Error:
                    continue
                self.rows.append((time.monotonic() - t0, name, rss))
            self.done.wait(self.every_s)


async def soak(base_url: str, requests: int, concurrency: int, sampler: RssSampler) -> Result:
    result = Result("soak-unique-images", "iris")
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=300) as client:

        async def one(i: int) -> None:
            # A unique image each time: nothing can be served from a cache.
            url = data_uri(encode(pattern(320 + i % 64, 240 + i % 48, seed=i), "JPEG"),
                           "image/jpeg")
            async with sem:
                await one_request(client, f"{base_url}/chat/completions",
                                  body_for("demo-vlm", url, 4), result)
            sampler.progress += 1
            if sampler.progress % 100 == 0:
                print(f">> {sampler.progress}/{requests} requests, "
                      f"{len(result.errors)} errors", flush=True)

        t0 = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(requests)))
        result.wall_s = time.perf_counter() - t0
    return result


def report(rows: list[tuple[float, str, float]], out: Path, max_growth_mb: float) -> bool:
    with (out / "rss.csv").open("w", newline="") as f:
        csv.writer(f).writerows([("t_s", "replica", "rss_mib"), *rows])
    ok = True
    print("| replica | RSS start MiB | middle | end | growth over 2nd half |")
    print("|---|---|---|---|---|")
    for name in sorted({r[1] for r in rows}):
        series = [r for r in rows if r[1] == name]
        start, mid, end = series[0][2], series[len(series) // 2][2], series[-1][2]
        growth = end - mid
        flag = growth > max_growth_mb
        ok &= not flag
        print(f"| {name} | {start:.0f} | {mid:.0f} | {end:.0f} | {growth:+.0f}"
              f"{' (still growing)' if flag else ''} |")
    return ok


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--base-url", default=None)
    p.add_argument("--sample-every", type=float, default=2.0)
    p.add_argument("--iris-env", action="append", default=None, metavar="KEY=VALUE",
                   help="config for the Iris this starts (default: both caches at 32 MiB, "
                   "so they fill early and a leak is not mistaken for a filling cache)")
    p.add_argument("--max-growth-mb", type=float, default=64.0,
                   help="allowed RSS growth of a replica over the second half of the run")
    args = p.parse_args()

    out = ROOT / "load_tests" / "results" / time.strftime("soak-%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    server: Server | None = None
    base_url = args.base_url
    if base_url is None:
        env = args.iris_env or ["IRIS_IMAGING__CACHE_MAX_BYTES=33554432",
                                "IRIS_FETCH__CACHE_MAX_BYTES=33554432"]
        server = servers(["iris"], dict(kv.split("=", 1) for kv in env))[0]
        server.port = free_port()
        server.env["IRIS_HTTP__PORT"] = str(server.port)
        print(f">> starting Iris on port {server.port}", flush=True)
        server.start(out / "iris.log")
        print(f">> ready after {server.wait_ready():.0f} s", flush=True)
        base_url = server.base_url
    sampler = RssSampler(args.sample_every)
    sampler.start()
    try:
        result = asyncio.run(soak(base_url, args.requests, args.concurrency, sampler))
    finally:
        sampler.done.set()
        sampler.join()
        if server is not None:
            server.stop()
    print(f">> {result.summary()}", flush=True)
    steady = report(sampler.rows, out, args.max_growth_mb)
    print(f">> wrote {out / 'rss.csv'}; memory {'levelled off' if steady else 'kept growing'}")
    return 0 if steady and not result.errors else 1


if __name__ == "__main__":
    sys.exit(main())
