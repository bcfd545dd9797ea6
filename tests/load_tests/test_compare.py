from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import httpx
import pytest

from load_tests import compare
from load_tests.compare import (
    WORKLOADS,
    Bench,
    Server,
    caches_markdown,
    combined,
    engine_counters,
    markdown,
    measure,
    parse_variant,
    rotated,
    servers,
    workloads,
)
from load_tests.workload import Images, Result, Workload, make_plan
from tests.servers import free_port


def test_iris_variant_is_iris_with_extra_settings() -> None:
    name, env = parse_variant("proxy:IRIS_HTTP__DIRECT_INGRESS=false,IRIS_ENGINE__CPU_CORES=off")
    assert name == "iris-proxy"
    assert env == {"IRIS_HTTP__DIRECT_INGRESS": "false", "IRIS_ENGINE__CPU_CORES": "off"}
    base, variant = servers(["iris", name], {"IRIS_X": "1"}, {name: env})
    assert variant.command == base.command and variant.port != base.port
    metrics = variant.env.pop("IRIS_METRICS_PORT")
    assert variant.env == {"IRIS_HTTP__PORT": str(variant.port), "IRIS_X": "1", **env}
    # Each Iris its own metrics port (8080 may be taken), where its engine's counters are.
    assert metrics != base.env["IRIS_METRICS_PORT"]
    assert variant.metrics_url == f"http://127.0.0.1:{metrics}/metrics"
    with pytest.raises(ValueError, match="NAME:KEY=VALUE"):
        parse_variant("proxy")


def test_peers_report_cached_tokens_and_keep_engine_stats_unless_told() -> None:
    vllm, rayllm = servers(["vllm", "rayllm"], {})
    assert "--enable-prompt-tokens-details" in vllm.command
    assert "--disable-log-stats" not in vllm.command
    assert vllm.metrics_url == f"http://127.0.0.1:{vllm.port}/metrics"
    port = rayllm.command[rayllm.command.index("--metrics-port") + 1]
    assert rayllm.metrics_url == f"http://127.0.0.1:{port}/metrics"
    vllm, rayllm = servers(["vllm", "rayllm"], {}, engine_stats=False)
    assert "--disable-log-stats" in vllm.command and "--no-engine-stats" in rayllm.command
    assert vllm.metrics_url is None and "--no-engine-stats" in vllm.no_metrics


def test_rounds_start_with_a_different_server_each() -> None:
    targets = ["vllm", "rayllm", "iris"]
    assert [rotated(targets, k)[0] for k in range(4)] == ["vllm", "rayllm", "iris", "vllm"]
    assert all(sorted(rotated(targets, k)) == sorted(targets) for k in range(3))


def _run(target: str, req_per_s: float, ttft_s: float) -> Result:
    """Ten requests in 10/req_per_s seconds, every first token after ttft_s."""
    return Result("small", target, wall_s=10 / req_per_s, ttft_s=[ttft_s] * 10, e2e_s=[0.1] * 10)


def test_rounds_report_medians_and_the_spread() -> None:
    results = [_run("vllm", 40, 0.02), _run("iris", 10, 0.05),
               _run("vllm", 20, 0.03), _run("iris", 50, 0.02),
               _run("vllm", 30, 0.04), _run("iris", 45, 0.03)]
    by = combined(results)
    assert by[("small", "iris")]["req_per_s"] == 45
    assert by[("small", "iris")]["ttft_p50_ms"] == 30
    assert by[("small", "iris")]["req_per_s_range"] == [10, 50]
    assert by[("small", "vllm")]["requests"] == 30 and by[("small", "vllm")]["rounds"] == 3
    table = markdown(results, ["vllm", "iris"])
    assert "45.0 req/s (10.0-50.0)" in table and "| 1.50x |" in table
    # One round: the numbers as measured, no spread.
    assert "(" not in markdown(results[:2], ["vllm", "iris"]).split("\n")[2]


def test_default_workloads_lead_with_the_realistic_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    # The same-image workloads' one image, without making a 12 MP one here.
    monkeypatch.setattr(compare, "same_image", lambda size: f"data:image/jpeg;base64,{size}")
    loads = workloads(40, 4, 8)
    assert [w.name for w in loads] == list(WORKLOADS)
    assert [w.name for w in loads[:3]] == ["fresh-small", "fresh-12mp", "chat-4turns"]
    by = {w.name: w for w in loads}
    assert by["fresh-small"].size == (640, 480) and by["fresh-small"].concurrency == 4
    assert by["fresh-12mp"].size == (4000, 3000) and by["fresh-12mp"].requests == 40
    assert (by["fresh-12mp-c1"].concurrency, by["fresh-12mp-c1"].requests) == (1, 10)
    chat = by["chat-4turns"]
    assert (chat.size, chat.turns, chat.concurrency, chat.requests) == ((1280, 960), 4, 4, 40)
    same = [w for w in loads if w.name.startswith("same")]
    assert all(w.note == "cache-friendly" and w.size is None for w in same)
    assert by["same-small"].label == "same-small (cache-friendly)"
    # Fresh and chat ones run (and are reported) before every cache-friendly one.
    assert max(loads.index(w) for w in loads if w.size) < min(loads.index(w) for w in same)
    # A subset keeps that order; a typo is refused.
    picked = workloads(40, 4, 8, ["chat-4turns", "fresh-small"])
    assert [w.name for w in picked] == ["fresh-small", "chat-4turns"]
    with pytest.raises(ValueError, match="fresh-smol"):
        workloads(40, 4, 8, ["fresh-smol"])


def test_embeddings_go_to_the_encoder_and_are_compared_with_vllms_pooling_server() -> None:
    embed = next(w for w in workloads(8, 4, 8, ["embed-fresh"]))
    chat = workloads(8, 4, 8, ["fresh-small"])[0]
    assert (embed.route, embed.concurrency, embed.size) == ("embeddings", 4, (640, 480))
    assert [t for t in ("vllm", "vllm-pooling", "rayllm", "iris") if compare.serves(t, embed)] \
        == ["vllm-pooling", "iris"]
    assert [t for t in ("vllm", "vllm-pooling", "rayllm", "iris") if compare.serves(t, chat)] \
        == ["vllm", "rayllm", "iris"]
    assert compare.model_of(embed) == "demo-clip" and compare.model_of(chat) == "demo-vlm"
    # Iris takes the image as an `input` item; vLLM's pooling server as chat-style messages.
    ours = json.loads(make_plan("demo-clip", embed, Images(salt=3), 1).bodies[0])
    theirs = json.loads(make_plan("demo-clip", embed, Images(salt=3), 1, messages=True).bodies[0])
    assert ours["input"][0]["image_url"] == theirs["messages"][0]["content"][0]["image_url"]
    results = [Result("embed-fresh", "vllm-pooling", wall_s=1.0, e2e_s=[0.1] * 4,
                      ttft_s=[0.1] * 4),
               Result("embed-fresh", "iris", wall_s=1.0, e2e_s=[0.1] * 5, ttft_s=[0.1] * 5)]
    row = markdown(results, ["vllm-pooling", "iris"]).splitlines()[-1]
    assert row.endswith("| 1.25x |"), row


VLLM_PAGE = """\
# HELP vllm:prefix_cache_queries Prefix cache queries, in terms of number of queried tokens.
# TYPE vllm:prefix_cache_queries counter
vllm:prefix_cache_queries_total{engine="0",model_name="demo-vlm"} 1200.0
vllm:prefix_cache_queries_created{engine="0",model_name="demo-vlm"} 1.7e9
vllm:prefix_cache_hits_total{engine="0",model_name="demo-vlm"} 300.0
vllm:external_prefix_cache_queries_total{engine="0",model_name="demo-vlm"} 99.0
vllm:mm_cache_queries_total{engine="0",model_name="demo-vlm"} 8.0
vllm:mm_cache_hits_total{engine="0",model_name="demo-vlm"} 6.0
vllm:request_success_total{engine="0",finished_reason="stop",model_name="demo-vlm"} 1.0
vllm:request_success_total{engine="0",finished_reason="length",model_name="demo-vlm"} 7.0
"""
RAY_PAGE = """\
# TYPE ray_vllm_prefix_cache_queries_total counter
ray_vllm_prefix_cache_queries_total{ReplicaId="a",engine="0",model_name="m"} 100.0
ray_vllm_prefix_cache_queries_total{ReplicaId="b",engine="0",model_name="m"} 50.0
ray_vllm_mm_cache_hits_total{ReplicaId="a",engine="0",model_name="m"} 2.0
ray_iris_fetch_cache_total{result="hit"} 5.0
ray_node_cpu_count 2.0
"""


def test_engine_counters_read_from_vllm_and_from_rays_metrics_agent() -> None:
    assert engine_counters(VLLM_PAGE) == {
        "prefix_cache_queries": 1200, "prefix_cache_hits": 300, "mm_cache_queries": 8,
        "mm_cache_hits": 6, "request_success": 8}
    # Summed over replicas; counters not exported yet (nothing counted) are zero.
    assert engine_counters(RAY_PAGE) == {
        "prefix_cache_queries": 150, "prefix_cache_hits": 0, "mm_cache_queries": 0,
        "mm_cache_hits": 2, "request_success": 0}
    assert engine_counters("ray_node_cpu_count 2.0\n# nothing else\n") is None


def test_cache_figures_sit_next_to_the_workloads_row() -> None:
    results = [Result("chat-4turns", t, wall_s=1, ttft_s=[0.01] * 4, e2e_s=[0.02] * 4,
                      prompt_tokens=400, cached_tokens=c, details=d)
               for t, c, d in (("vllm", 100, 4), ("rayllm", 0, 0), ("iris", 300, 4))]
    caches = [
        {"workload": "chat-4turns", "target": "vllm", "round": 1, "prefix_cache_queries": 400,
         "prefix_cache_hits": 100, "prefix_cache_hit_pct": 25.0, "mm_cache_queries": 4,
         "mm_cache_hits": 3, "mm_cache_hit_pct": 75.0, "engine_requests": 4, "note": ""},
        {"workload": "chat-4turns", "target": "rayllm", "round": 1,
         **dict.fromkeys(compare.ENGINE_FIGURES), "note": "http://x/metrics: ConnectError"},
    ]
    by = combined(results, caches)
    assert by[("chat-4turns", "vllm")]["cached_tokens_pct"] == 25.0
    assert by[("chat-4turns", "vllm")]["mm_cache_hit_pct"] == 75.0
    assert by[("chat-4turns", "rayllm")]["cached_tokens"] is None  # not reported
    assert by[("chat-4turns", "rayllm")]["prefix_cache_hit_pct"] is None
    assert "engine_note" not in by[("chat-4turns", "iris")]  # not read for it
    labels = {"chat-4turns": "chat-4turns (4 turns)"}
    table = markdown(results, ["vllm", "rayllm", "iris"], labels, caches)
    row = next(line for line in table.splitlines() if line.startswith("| chat-4turns (4 turns)"))
    assert "cached tokens 25.0%, prefix-cache hits 25.0%, mm-cache hits 75.0%" in row
    assert "cached tokens n/a, prefix-cache hits n/a" in row
    detail = caches_markdown(results, caches, labels)
    assert "| 100 / 400 (25.0%) | 100 / 400 (25.0%) | 3 / 4 (75.0%) |" in detail
    assert "ConnectError" in detail and "not reported" in detail and "not read" in detail


# A hang guard, not a speed limit (the run takes ~3 s): long enough for Server.stop's own
# escalation (SIGINT, then SIGTERM after 60 s), which a clean-clone run once needed.
@pytest.mark.timeout(150)
def test_measure_end_to_end_against_a_loopback_fake(tmp_path: Path) -> None:
    """compare's whole measurement against a fake server process exporting its counters late,
    as Ray's metrics agent does: distinct images (the fake's multimodal cache never hits),
    conversations (it does, from turn 2), CPU per request, cache figures after the export."""
    port = free_port()
    server = Server("iris", [sys.executable, "-m", "tests.load_tests.fake_openai",
                             "--port", str(port), "--ray", "--interval", "0.3",
                             "--cpu-ms", "20"], port,
                    metrics_url=f"http://127.0.0.1:{port}/metrics")
    server.start(tmp_path / "fake.log")
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=1)
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline, (tmp_path / "fake.log").read_text()
                time.sleep(0.1)
        bench = Bench(Images(salt=1), warmup=2, scrape=frozenset({"fresh-small", "chat-4turns"}),
                      settle_s=10)
        loads = [Workload("fresh-small", size=(64, 48), requests=6, concurrency=2),
                 Workload("embed-fresh", size=(64, 48), requests=3, route="embeddings"),
                 Workload("chat-4turns", size=(64, 48), turns=4, requests=8, concurrency=2),
                 Workload("same-small", ("data:image/jpeg;base64,AAAA",), requests=4, note="x")]
        measure(bench, server, loads, 0)
    finally:
        server.stop()
    assert [(r.workload, r.ok, len(r.errors)) for r in bench.results] == [
        ("fresh-small", 6, 0), ("embed-fresh", 3, 0), ("chat-4turns", 8, 0), ("same-small", 4, 0)]
    assert [row["workload"] for row in bench.cpu] == [w.name for w in loads]
    # The fake spends 20 ms of CPU on each request: the meter finds it in the server's process
    # (at least most of it: CPU time moves in 10 ms ticks), and per request.
    assert all(row["cpu_ms"].get("fake_openai", 0) >= 10 for row in bench.cpu), bench.cpu
    fresh, chat = bench.caches
    # Warm-ups excluded: exactly the measured requests, after the late export.
    assert (fresh["engine_requests"], chat["engine_requests"]) == (6, 8) and not chat["note"]
    assert fresh["mm_cache_queries"] == 6 and fresh["mm_cache_hits"] == 0
    assert (chat["mm_cache_queries"], chat["mm_cache_hits"]) == (8, 6)  # turns 2-4 hit
    assert chat["prefix_cache_hit_pct"] > 50
    by = combined(bench.results, bench.caches)
    assert by[("chat-4turns", "iris")]["cached_tokens_pct"] == chat["prefix_cache_hit_pct"]
    assert bench.images.made == 6 + 2 + 3 + 2 + 2 + 1  # measured and warm-up, each its own
