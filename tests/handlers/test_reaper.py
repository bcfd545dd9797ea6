"""An engine's processes end with the process that started them, even when that one is
SIGKILLed (vLLM's EngineCore would otherwise live on with its memory)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil

from tests.support import ROOT

PARENT = r"""
import subprocess, sys, time
sys.path.insert(0, sys.argv[1])
from handlers.reaper import Reaper
engine = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"],
                          start_new_session=True)  # like EngineCore: not in our group
reaper = Reaper()
reaper.watch([engine.pid])
print(engine.pid, flush=True)
time.sleep(600)
"""


def gone(pid: int) -> bool:
    return not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_a_killed_parents_engine_process_is_ended() -> None:
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(ROOT)], stdout=subprocess.PIPE,
                              text=True)
    assert parent.stdout is not None
    engine = int(parent.stdout.readline())
    try:
        assert not gone(engine)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 30  # a guard against hanging, not a timing assertion
        while not gone(engine) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert gone(engine)
    finally:
        if not gone(engine):
            os.kill(engine, signal.SIGKILL)


CORE = r"""
import subprocess, sys, time
worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
print(worker.pid, flush=True)
time.sleep(600)
"""


def test_a_killed_cores_orphaned_worker_is_ended_by_its_remembered_tree() -> None:
    """What the Supervisor does before restarting an engine whose core was killed: the
    core's worker, now an orphan, is ended from the tree remembered at start."""
    from handlers.reaper import end_processes, process_tree

    core = subprocess.Popen([sys.executable, "-c", CORE], stdout=subprocess.PIPE, text=True)
    assert core.stdout is not None
    worker = int(core.stdout.readline())
    try:
        tree = process_tree([core.pid])
        assert sorted(p.pid for p in tree) == sorted([core.pid, worker])
        os.kill(core.pid, signal.SIGKILL)
        core.wait()
        assert not gone(worker)  # nobody else ends it
        assert end_processes(tree) == 1
        assert gone(worker)
    finally:
        if not gone(worker):
            os.kill(worker, signal.SIGKILL)
