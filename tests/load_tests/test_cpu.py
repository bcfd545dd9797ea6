"""The CPU breakdown that `load_tests.compare` prints: labels and per-request accounting."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from load_tests.cpu import CpuMeter, process_label


@pytest.mark.parametrize(("cmdline", "label"), [
    (["ray::ServeReplica:iris:ChatIngress.handle_request"], "ChatIngress"),
    (["ray::ServeReplica:iris:LLMServer"], "LLMServer"),
    (["ray::ProxyActor"], "ProxyActor"),
    (["VLLM::EngineCore"], "EngineCore"),
    (["/x/.venv/bin/python", "-m", "vllm.entrypoints.openai.api_server", "--model", "m"],
     "api_server"),
    (["/x/ray/core/src/ray/raylet/raylet", "--raylet_socket_name=a"], "raylet"),
])
def test_process_labels(cmdline: list[str], label: str) -> None:
    assert process_label(cmdline, "") == label


def test_meter_counts_a_busy_child_per_request() -> None:
    meter = CpuMeter(os.getpid())
    before = meter.snapshot()
    # Spins until the process has used 0.63 s of CPU in all (a margin over the 0.6 s asserted:
    # CPU time is counted in 10 ms ticks), then stays alive (idle) so the second snapshot
    # still sees it.
    code = ("import time\n"
            "while time.process_time() < 0.63: pass\nprint('done', flush=True)\n"
            "time.sleep(60)")
    # argv[0] "busy-child" gives the child a label of its own.
    child = subprocess.Popen(["bash", "-c", 'exec -a busy-child "$0" -c "$1"',
                              sys.executable, code], stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == b"done"
        time.sleep(0.1)
        used = CpuMeter.per_request_ms(before, meter.snapshot(), requests=3)
    finally:
        child.kill()
        child.wait()
    # 0.6 s over 3 requests is >= 200 ms each.
    assert used["busy-child"] >= 200
