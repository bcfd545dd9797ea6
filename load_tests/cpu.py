"""Where CPU time goes: per-process CPU seconds of a server's process tree over a workload.

On a 2-core machine throughput is bounded by total CPU per request, so this is the table
that says which hop to work on. Note: vLLM's GPU/CPU worker busy-polls its input queue for
a second after each message, so its figure includes spinning and grows to fill idle CPU.
"""

from __future__ import annotations

import psutil


def process_label(cmdline: list[str], name: str) -> str:
    """A stable, short name for a process: the Serve deployment, the vLLM role, the binary."""
    cmd = " ".join(cmdline) or name
    first = cmd.split()[0]
    if first.startswith("ray::ServeReplica:"):
        # The title also names the method running right now; keep the deployment.
        return first.removeprefix("ray::ServeReplica:").split(".")[0].split(":")[-1]
    if first.startswith(("ray::", "VLLM::")):
        return first.split("::", 1)[1].split(".")[0]
    for arg in cmdline[1:3]:
        if arg == "-m" and len(cmdline) > 2:
            return cmdline[2].rsplit(".", 1)[-1]
    return first.rsplit("/", 1)[-1]


class CpuMeter:
    """CPU seconds used by a process and all its descendants, by label, between snapshots."""

    def __init__(self, root_pid: int) -> None:
        self.root_pid = root_pid

    def snapshot(self) -> dict[int, tuple[str, float]]:
        try:
            root = psutil.Process(self.root_pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            return {}
        out: dict[int, tuple[str, float]] = {}
        for proc in procs:
            try:
                t = proc.cpu_times()
                out[proc.pid] = (process_label(proc.cmdline(), proc.name()), t.user + t.system)
            except psutil.Error:
                continue
        return out

    @staticmethod
    def per_request_ms(before: dict[int, tuple[str, float]],
                       after: dict[int, tuple[str, float]], requests: int) -> dict[str, float]:
        """CPU ms per request by label, largest first (processes gone since are not counted)."""
        by: dict[str, float] = {}
        for pid, (label, t) in after.items():
            used = t - before.get(pid, (label, 0.0))[1]
            if used > 0:
                by[label] = by.get(label, 0.0) + used
        ms = {k: round(1000 * v / max(1, requests), 1) for k, v in by.items()}
        return dict(sorted(ms.items(), key=lambda kv: -kv[1]))
