from __future__ import annotations

import json
from pathlib import Path

import pytest

from load_tests.ceiling import CEILING, report, rerender, sse_pieces
from load_tests.compare import combined, workloads
from load_tests.workload import Result


def run(workload: str, target: str, req_per_s: float, n: int = 10) -> Result:
    return Result(workload, target, wall_s=n / req_per_s, ttft_s=[0.1] * n, e2e_s=[0.2] * n)


def test_report_says_a_target_is_out_of_reach_when_the_engine_alone_is_below_it() -> None:
    loads = workloads(96, 4, 8, ["fresh-small", "embed-fresh"])
    results = [run("fresh-small", "vllm", 10), run("fresh-small", CEILING, 10.5),
               run("fresh-small", "vllm", 12), run("fresh-small", CEILING, 12.6),
               run("embed-fresh", "vllm-pooling", 95), run("embed-fresh", CEILING, 176)]
    table = report(combined(results), loads)
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines()}
    # Medians over rounds (11 and 11.55 req/s): 1.05x, under fresh-small's 1.1x target;
    # vLLM's server loses 5% to what it does in front of the engine, a server that met the
    # target could lose none.
    assert "| 1.05x | 1.1x | **no** | 5% | 0% |" in rows["fresh-small"]
    assert "11.0 (10.0-12.0)" in rows["fresh-small"]
    # Embeddings are measured against vLLM's pooling server.
    # 1.85x: the front costs vLLM's pooling server 46% of the engine's req/s; at 1.0x a
    # server's may cost as much.
    assert "| 1.85x | 1.0x | yes | 46% | 46% |" in rows["embed-fresh"]


def test_report_leaves_a_workload_without_both_sides_unjudged() -> None:
    loads = workloads(96, 4, 8, ["chat-4turns"])
    (row,) = report(combined([run("chat-4turns", "vllm", 7)]), loads).splitlines()[2:]
    assert "| n/a | 1.3x |  | n/a |  |" in row


def test_an_engine_alone_slower_than_the_server_bounds_nothing() -> None:
    loads = workloads(96, 4, 8, ["chat-4turns"])
    table = report(combined([run("chat-4turns", "vllm", 7), run("chat-4turns", CEILING, 6)]),
                   loads)
    assert "| 0.86x | 1.3x | no bound: the engine alone was slower | -17% |  |" in table


def frame(delta: dict[str, str], usage: dict[str, int] | None = None) -> str:
    chunk = {"choices": [{"delta": delta}], "usage": usage}
    return f"data: {json.dumps(chunk)}\n\n"


def test_sse_frames_give_the_text_the_usage_and_the_end() -> None:
    text = frame({"role": "assistant"}) + frame({"content": "a c"}) + frame({"content": "at"})
    assert sse_pieces(text) == ("a cat", None, False)
    assert sse_pieces(frame({}, {"prompt_tokens": 3}) + "data: [DONE]\n\n") == (
        "", {"prompt_tokens": 3}, True)
    with pytest.raises(RuntimeError, match="too long"):
        sse_pieces(f"data: {json.dumps({'error': {'message': 'too long'}})}\n\n")


def test_a_finished_run_reports_again_from_its_results_file(tmp_path: Path) -> None:
    loads = workloads(96, 4, 8, ["fresh-12mp"])
    by = combined([run("fresh-12mp", "vllm", 2.4), run("fresh-12mp", CEILING, 3.3)])
    (tmp_path / "results.json").write_text(json.dumps({"combined": list(by.values())}))
    assert rerender(tmp_path, loads) == report(by, loads)
    # 12 MP has two targets: 1.2x with exact resizing, 2.5x with fast.
    assert "| 1.38x | 1.2x (exact), 2.5x (fast) | yes, **no** | 27% | 13%, 0% |" in rerender(
        tmp_path, loads)
