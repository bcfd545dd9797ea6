"""A local multi-node Ray cluster for the autoscaling scenario, and Serve status helpers.

The head is the only node with the `iris_cpu_node` resource (the CPU deployments go there);
the workers each have one logical GPU."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import Any

CPU_NODE_RESOURCE = "iris_cpu_node"


@contextlib.contextmanager
def no_address_file() -> Iterator[None]:
    """Keep `Cluster` away from /tmp/ray/ray_current_cluster: it writes its address there
    (so any other `ray.init()` on this machine would join *this* cluster) and deletes the
    file on shutdown (even if another cluster wrote it)."""
    import ray._common.utils
    import ray._private.utils

    saved = ray._private.utils.write_ray_address, ray._common.utils.reset_ray_address
    ray._private.utils.write_ray_address = lambda *a, **k: None
    ray._common.utils.reset_ray_address = lambda *a, **k: None
    try:
        yield
    finally:
        ray._private.utils.write_ray_address, ray._common.utils.reset_ray_address = saved


def start_cluster(temp_dir: str) -> Any:
    """Head (CPU only, hosts the CPU deployments) + two 1-GPU workers, with their own temp
    dir, random ports, no dashboard and no address file, so the cluster co-exists with
    any other Ray instance on this machine."""
    from ray.cluster_utils import Cluster

    common = {"temp_dir": temp_dir, "include_dashboard": False,
              "dashboard_agent_listen_port": None}
    with no_address_file():
        cluster = Cluster(initialize_head=True, head_node_args={
            **common, "num_cpus": 4, "resources": {CPU_NODE_RESOURCE: 100},
            "object_store_memory": 300 << 20,
        })
        for _ in range(2):
            cluster.add_node(**common, num_cpus=2, num_gpus=1,  # type: ignore[arg-type]
                             object_store_memory=200 << 20)  # (Ray types add_node's kwargs loosely)
    cluster.wait_for_nodes()
    return cluster


def replica_counts(app: str) -> dict[str, dict[str, int]]:
    """{deployment: {replica state: count}} from Serve's status."""
    from ray import serve

    status = serve.status().applications.get(app)
    if status is None:
        return {}
    return {name: {str(getattr(k, "value", k)): int(v) for k, v in d.replica_states.items()}
            for name, d in status.deployments.items()}


def running(counts: dict[str, dict[str, int]], name: str) -> int:
    return counts.get(name, {}).get("RUNNING", 0)


def total(counts: dict[str, dict[str, int]], name: str) -> int:
    return sum(counts.get(name, {}).values())


async def llm_node_ids(handle: Any, calls: int = 4) -> set[str]:
    """Node ids of LLMServer replicas that answer (only call with replicas up:
    a call at zero replicas would itself trigger a scale-up)."""
    async def one() -> str | None:
        try:
            stats = await asyncio.wait_for(handle.record_routing_stats.remote(), 10)
            return str(stats["node_id"])
        except Exception:
            return None

    got = await asyncio.gather(*(one() for _ in range(calls)))
    return {g for g in got if g}
