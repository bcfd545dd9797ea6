"""load_tests.coldstart reads its phases from the servers' own log lines: vLLM's (with and
without a process prefix), Serve's; and it starts Iris from zero in the split layout."""

from __future__ import annotations

from pathlib import Path

import yaml

from handlers.config_load import load_config
from load_tests.coldstart import engine_marks, iris_config_file, phases, vllm_stamp

LOG = """\
(APIServer pid=10) INFO 12-01 19:00:01 [api_server.py:1] vLLM API server version 0.32
(EngineCore pid=11) INFO 12-01 19:00:20 [core.py:93] Initializing a V1 LLM engine (v0.32)
(Worker pid=12) INFO 12-01 19:00:41 [cpu_worker.py:1] something
(Worker pid=12) INFO 12-01 19:00:43 [default_loader.py:2] Loading weights took 0.50 seconds
(EngineCore pid=11) INFO 12-01 19:00:47 [core.py:2] init engine (profile, create kv cache, \
warmup model) took 3.1 seconds
INFO 12-01 18:59:00 [core.py:2] init engine (profile, create kv cache, warmup model) took 9 s
"""


def test_engine_marks_are_the_first_lines_of_each_process_after_the_start() -> None:
    t0 = vllm_stamp("12-01 19:00:00")
    marks = engine_marks(LOG.splitlines(), t0)
    assert {k: v - t0 for k, v in marks.items()} == {
        "engine core up": 20, "worker up": 41, "weights loaded": 43, "engine ready": 47}
    # Lines of an earlier start (an encoder, an earlier run) are not this start's.
    assert engine_marks(LOG.splitlines()[-1:], t0) == {}


def test_each_phase_counts_from_the_previous_mark_found() -> None:
    rows = phases([("a", 5.0), ("b", None), ("c", 12.5)], 0.0)
    assert rows == [{"phase": "a", "at_s": 5.0, "took_s": 5.0},
                    {"phase": "b", "at_s": None, "took_s": None},
                    {"phase": "c", "at_s": 12.5, "took_s": 7.5}]


def test_iris_starts_split_with_the_engine_at_zero_and_no_encoder(tmp_path: Path) -> None:
    path = iris_config_file(tmp_path)
    raw = yaml.safe_load(path.read_text())
    cfg = load_config(use_yaml=False, **raw)
    assert cfg.encoder is None and not cfg.deployments.engine_in_ingress
    scaling = cfg.deployments.llm.autoscaling_config
    assert scaling is not None
    assert (scaling["min_replicas"], scaling["initial_replicas"]) == (0, 0)
