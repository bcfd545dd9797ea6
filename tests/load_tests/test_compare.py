from __future__ import annotations

import pytest

from load_tests.compare import combined, markdown, parse_variant, rotated, servers
from load_tests.workload import Result


def test_iris_variant_is_iris_with_extra_settings() -> None:
    name, env = parse_variant("proxy:IRIS_HTTP__DIRECT_INGRESS=false,IRIS_ENGINE__CPU_CORES=off")
    assert name == "iris-proxy"
    assert env == {"IRIS_HTTP__DIRECT_INGRESS": "false", "IRIS_ENGINE__CPU_CORES": "off"}
    base, variant = servers(["iris", name], {"IRIS_X": "1"}, {name: env})
    assert variant.command == base.command and variant.port != base.port
    assert variant.env == {"IRIS_HTTP__PORT": str(variant.port), "IRIS_X": "1", **env}
    with pytest.raises(ValueError, match="NAME:KEY=VALUE"):
        parse_variant("proxy")


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
