"""No engine outlives the process that started it.

vLLM's EngineCore runs in a child process that only learns of its parent's end when the
parent says goodbye: if the parent is killed (SIGKILL, OOM, a node draining), the engine keeps
its memory (and GPU) forever. A tiny watcher process, started beside it, holds a pipe from the
parent; when the pipe closes, however the parent ended, it kills the engine processes the
parent last named, with their children.

    guard = Reaper()          # in the process that starts engines
    guard.watch([core_pid])   # after each engine start
    guard.watch([])           # after a clean engine shutdown
"""

from __future__ import annotations

import subprocess
import sys

import psutil

# The watcher: reads lines of pids from stdin, the last line being the current set; at EOF
# (the parent closed the pipe or died), ends those processes and their descendants.
_WATCHER = r"""
import sys, psutil
pids = []
for line in sys.stdin:
    pids = [int(p) for p in line.split()]
procs = []
for pid in pids:
    try:
        p = psutil.Process(pid)
        procs += [p, *p.children(recursive=True)]
    except psutil.Error:
        pass
for p in procs:
    try:
        p.terminate()
    except psutil.Error:
        pass
_, alive = psutil.wait_procs(procs, timeout=5)
for p in alive:
    try:
        p.kill()
    except psutil.Error:
        pass
"""


class Reaper:
    def __init__(self) -> None:
        # Its own session: a signal to this process's group does not reach it first.
        self._proc = subprocess.Popen([sys.executable, "-c", _WATCHER], stdin=subprocess.PIPE,
                                      start_new_session=True, text=True)

    def watch(self, pids: list[int]) -> None:
        """The engine processes to end if this process dies (replaces the previous set)."""
        if self._proc.stdin is not None and self._proc.poll() is None:
            self._proc.stdin.write(" ".join(str(p) for p in pids) + "\n")
            self._proc.stdin.flush()

    def close(self) -> None:
        """This process is ending cleanly: the watcher ends what is still named, then exits."""
        if self._proc.stdin is not None:
            self._proc.stdin.close()


def process_tree(pids: list[int], *, children: bool = True) -> list[psutil.Process]:
    """The processes `pids` and (`children`) their descendants, as they are now (each
    remembered with its start time, so that a reused pid is never mistaken for it later).
    A pid already gone is left out."""
    out: list[psutil.Process] = []
    for pid in pids:
        try:
            p = psutil.Process(pid)
            out += [p, *(p.children(recursive=True) if children else [])]
        except psutil.Error:
            pass
    return out


def alive(p: psutil.Process) -> bool:
    """Still running: not exited, not a zombie waiting for its parent to reap it."""
    try:
        return bool(p.is_running() and p.status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


def end_processes(procs: list[psutil.Process], timeout_s: float = 5.0) -> int:
    """SIGTERM, then SIGKILL after `timeout_s`, to those of `procs` still running (a killed
    EngineCore's workers are orphans nobody else ends). Returns how many were running."""
    running = [p for p in procs if p.is_running()]
    for p in running:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(running, timeout=timeout_s)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    return len(running)
