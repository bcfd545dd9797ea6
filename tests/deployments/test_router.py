"""ImageAffinityRouter: a real Serve RequestRouter built as Serve builds it, with fake replicas
(real ReplicaIDs) and real PendingRequests. No Ray cluster: nothing here starts Ray."""

from __future__ import annotations

import asyncio
import importlib.abc
import sys
from collections import Counter
from types import SimpleNamespace
from typing import Any

import pytest
from ray.serve._private.common import DeploymentHandleSource, ReplicaID, RequestMetadata
from ray.serve._private.test_utils import FAKE_REPLICA_DEPLOYMENT_ID as DEPLOYMENT
from ray.serve._private.test_utils import FakeRunningReplica
from ray.serve.config import RequestRouterConfig
from ray.serve.request_router import PendingRequest

from deployments.router import (
    DEFAULT_IMBALANCE_MARGIN,
    ImageAffinityRouter,
    affinity_key_of,
    rank_replicas,
    rendezvous_order,
    rendezvous_score,
)

MAX_ONGOING = 16


def fake(unique_id: str, max_ongoing_requests: int = MAX_ONGOING, queue_len: int = 0) \
        -> FakeRunningReplica:
    """Serve's own RunningReplica stand-in for its router tests (a real ReplicaID; a queue
    length answered to probes)."""
    replica = FakeRunningReplica(unique_id, max_ongoing_requests=max_ongoing_requests)
    replica.set_queue_len_response(queue_len)
    return replica


def make_router(**kwargs: Any) -> ImageAffinityRouter:
    """As Serve's AsyncioRouter.request_router builds it (router.py), then initialize_state."""
    router = ImageAffinityRouter(
        deployment_id=DEPLOYMENT,
        handle_source=DeploymentHandleSource.REPLICA,
        self_node_id="node-1",
        self_actor_id="ingress-actor",
        self_actor_handle=None,
        use_replica_queue_len_cache=True,
        create_replica_wrapper_func=lambda info: info,
        prefer_local_node_routing=False,
        prefer_local_az_routing=False,
        self_availability_zone=None,
    )
    router.initialize_state(**kwargs)
    return router


async def with_replicas(router: ImageAffinityRouter, replicas: list[FakeRunningReplica]) -> None:
    """Serve's update_replicas, then let its background queue-length probe finish."""
    router.update_replicas(replicas)
    for _ in range(5):
        await asyncio.sleep(0)
    for r in replicas:  # the probe filled the queue-length cache
        assert router._replica_queue_len_cache.get(r.replica_id) == r._queue_len


def request(key: Any = None, *, as_dict: bool = False, n: int = 0) -> PendingRequest:
    body: Any = {"affinity_key": key} if as_dict else SimpleNamespace(affinity_key=key)
    return PendingRequest(
        args=[body],
        kwargs={},
        metadata=RequestMetadata(request_id=f"req-{n}", internal_request_id=f"int-{n}",
                                 call_method="chat"),
    )


def ids(groups: list[list[Any]]) -> list[list[str]]:
    return [[r.replica_id.unique_id for r in g] for g in groups]


async def home_of(router: ImageAffinityRouter, key: str) -> str:
    groups = await router.choose_replicas(router._replicas_list, request(key))
    assert len(groups[0]) == 1
    return groups[0][0].replica_id.unique_id


def replicas(*names: str) -> list[FakeRunningReplica]:
    return [fake(n) for n in names]


# --- the hash -------------------------------------------------------------------------------

def test_score_is_a_stable_hash_not_pythons_salted_hash() -> None:
    # Golden value: every ingress process (and every Iris version in a rolling update) must
    # compute the same weights. blake2b-64 of "key\x00replica", big-endian.
    assert rendezvous_score("img:abc", "r1") == 0xB389F43FF9CC1B4D
    rids = [f"replica-{i}" for i in range(10)]
    for key in ("img:abc", "pck:user-42", "é\u2603"):
        by_score = sorted(rids, key=lambda r, k=key: rendezvous_score(k, r), reverse=True)
        assert rendezvous_order(key, rids) == by_score == rendezvous_order(key, rids[::-1])


async def test_affinity_key_is_read_defensively() -> None:
    # async: Serve's PendingRequest makes an asyncio future, which needs a running loop.
    assert affinity_key_of(request("k")) == "k"
    assert affinity_key_of(request("k", as_dict=True)) == "k"
    assert affinity_key_of(request(None)) is None
    assert affinity_key_of(request("")) is None
    assert affinity_key_of(request(123)) is None
    assert affinity_key_of(SimpleNamespace(args=[], kwargs={"request": {"affinity_key": "kw"}}))\
        == "kw"
    assert affinity_key_of(SimpleNamespace(args=[object()], kwargs={})) is None
    assert affinity_key_of(None) is None
    long_key = affinity_key_of(request("k" * 100_000))
    assert long_key == affinity_key_of(request("k" * 100_000, as_dict=True))
    assert long_key is not None and len(long_key) == 34
    assert long_key != affinity_key_of(request("k" * 99_999))


# --- stickiness and spread ------------------------------------------------------------------

async def test_choice_is_deterministic_and_identical_across_router_instances() -> None:
    a, b = make_router(), make_router()
    # Two ingress processes: their own replica wrappers, the same replica ids, another order.
    await with_replicas(a, replicas("r1", "r2", "r3", "r4"))
    await with_replicas(b, replicas("r4", "r2", "r1", "r3"))
    for i in range(300):
        key = f"img:{i}"
        first = ids(await a.choose_replicas(a._replicas_list, request(key)))
        assert first == ids(await a.choose_replicas(a._replicas_list, request(key)))
        assert first == ids(await b.choose_replicas(b._replicas_list, request(key)))
        # Home first, then the other replicas in the key's rendezvous order.
        assert [r for g in first for r in g] == rendezvous_order(key, ["r1", "r2", "r3", "r4"])
    assert a.diverted == b.diverted == 0
    assert a.routed_with_key == 600


async def test_keys_spread_evenly_over_replicas() -> None:
    router = make_router()
    await with_replicas(router, replicas("r1", "r2", "r3"))
    homes = Counter([await home_of(router, f"key-{i}") for i in range(3000)])
    assert set(homes) == {"r1", "r2", "r3"}
    for count in homes.values():
        assert 0.25 * 3000 <= count <= 0.42 * 3000, homes


async def test_removing_a_replica_moves_only_its_keys() -> None:
    router = make_router()
    fleet = replicas("r1", "r2", "r3", "r4")
    await with_replicas(router, fleet)
    keys = [f"key-{i}" for i in range(2000)]
    before = {k: await home_of(router, k) for k in keys}

    router.on_replica_actor_died(fleet[1].replica_id)  # r2 dies
    after = {k: await home_of(router, k) for k in keys}
    moved = [k for k in keys if before[k] != after[k]]
    assert moved and all(before[k] == "r2" for k in moved)
    assert all(after[k] != "r2" for k in keys)
    assert len(moved) == sum(1 for k in keys if before[k] == "r2")

    await with_replicas(router, [fleet[0], fleet[2], fleet[3]])  # the controller's update
    assert {k: await home_of(router, k) for k in keys} == after


async def test_adding_a_replica_moves_about_one_in_n_keys_all_to_it() -> None:
    router = make_router()
    fleet = replicas("r1", "r2", "r3", "r4")
    await with_replicas(router, fleet)
    keys = [f"key-{i}" for i in range(3000)]
    before = {k: await home_of(router, k) for k in keys}

    await with_replicas(router, [*fleet, fake("r5")])
    after = {k: await home_of(router, k) for k in keys}
    moved = [k for k in keys if before[k] != after[k]]
    assert all(after[k] == "r5" for k in moved)
    assert 0.14 * len(keys) <= len(moved) <= 0.26 * len(keys), len(moved)  # ~1/5


# --- the load guard -------------------------------------------------------------------------

async def test_home_over_the_margin_diverts_to_next_rendezvous_choice_and_counts() -> None:
    router = make_router(imbalance_margin=4)
    await with_replicas(router, replicas("r1", "r2", "r3", "r4"))
    key = "img:hot"
    order = rendezvous_order(key, ["r1", "r2", "r3", "r4"])
    cache = router._replica_queue_len_cache
    by_id = {r.replica_id.unique_id: r for r in router._replicas_list}
    for uid in order:
        cache.update(by_id[uid].replica_id, 1)

    cache.update(by_id[order[0]].replica_id, 5)  # 5 - 1 = 4: within the margin
    assert ids(await router.choose_replicas(router._replicas_list, request(key)))[0] == [order[0]]
    assert router.diverted == 0

    cache.update(by_id[order[0]].replica_id, 6)  # 6 - 1 > 4: diverted
    pr = request(key, n=1)
    groups = ids(await router.choose_replicas(router._replicas_list, pr))
    assert groups == [[order[1]], [order[2]], [order[3]], [order[0]]]
    assert router.diverted == 1 and router.diverted_by_reason["imbalance"] == 1
    # Serve calls choose_replicas again for the same request after a backoff: counted once.
    await router.choose_replicas(router._replicas_list, pr)
    assert router.diverted == 1
    assert pr.routing_context.should_backoff is True


async def test_full_home_diverts_even_within_the_margin() -> None:
    router = make_router()  # default margin 8
    fleet = [fake("r1", 4), fake("r2", 4), fake("r3", 4)]
    await with_replicas(router, fleet)
    key = "img:full"
    order = rendezvous_order(key, ["r1", "r2", "r3"])
    by_id = {r.replica_id.unique_id: r for r in fleet}
    cache = router._replica_queue_len_cache
    cache.update(by_id[order[0]].replica_id, 4)  # at max_ongoing_requests
    cache.update(by_id[order[1]].replica_id, 3)
    cache.update(by_id[order[2]].replica_id, 0)
    groups = ids(await router.choose_replicas(router._replicas_list, request(key)))
    # The next rendezvous choice, not the least loaded: a hot key overflows to one replica.
    assert groups == [[order[1]], [order[2]], [order[0]]]
    assert router.diverted_by_reason == {"full": 1, "imbalance": 0}

    cache.update(by_id[order[1]].replica_id, 4)  # the second choice fills up too
    groups = ids(await router.choose_replicas(router._replicas_list, request(key, n=2)))
    assert groups == [[order[2]], [order[0], order[1]]]
    assert router.diverted == 2


async def test_unknown_home_queue_keeps_the_home() -> None:
    router = make_router(imbalance_margin=0)
    await with_replicas(router, replicas("r1", "r2", "r3"))
    key = "img:cold"
    order = rendezvous_order(key, ["r1", "r2", "r3"])
    router._replica_queue_len_cache.invalidate_key(
        ReplicaID(unique_id=order[0], deployment_id=DEPLOYMENT))
    for uid in order[1:]:
        router._replica_queue_len_cache.update(ReplicaID(uid, DEPLOYMENT), 0)
    assert await home_of(router, key) == order[0]
    assert router.diverted == 0


# --- through Serve's own routing loop (choose -> probe/cache -> fulfil) ---------------------

async def route(router: ImageAffinityRouter, pr: PendingRequest) -> str:
    # The timeout only turns a routing hang into a failure; nothing here is timed.
    replica = await asyncio.wait_for(router._choose_replica_for_request(pr), timeout=30)
    return replica.replica_id.unique_id


async def test_serve_moves_from_a_full_home_to_the_next_rendezvous_choice() -> None:
    router = make_router()
    names = ["r1", "r2", "r3", "r4"]
    key = "img:busy"
    order = rendezvous_order(key, names)
    fleet = {n: fake(n, max_ongoing_requests=4) for n in names}
    await with_replicas(router, list(fleet.values()))
    assert await route(router, request(key)) == order[0]

    # The cache does not know yet that the home is full: Serve probes it, sees it full,
    # and takes the next group, the second rendezvous choice (not a random replica).
    router._replica_queue_len_cache.invalidate_key(fleet[order[0]].replica_id)
    fleet[order[0]].set_queue_len_response(4)
    assert await route(router, request(key, n=1)) == order[1]
    assert router.diverted == 0
    # Now the cache says full: the load guard diverts before any probe, and counts it.
    assert router._replica_queue_len_cache.get(fleet[order[0]].replica_id) == 4
    assert await route(router, request(key, n=2)) == order[1]
    assert router.diverted == 1


async def test_concurrent_calls_of_one_ingress_request_each_reach_their_home() -> None:
    # Handle calls made while serving one ingress request share its internal_request_id.
    # Serve's base fulfilment (matching on that id) would leave all but one of them pending
    # forever; each must get the replica chosen for its own key.
    router = make_router()
    await with_replicas(router, replicas("r1", "r2", "r3"))
    keys = [f"img:{i}" for i in range(12)]
    prs = [request(k, n=i) for i, k in enumerate(keys)]
    for pr in prs:
        pr.metadata.internal_request_id = "one-ingress-request"
    got = await asyncio.wait_for(asyncio.gather(*(route(router, pr) for pr in prs)), 30)
    assert got == [rendezvous_order(k, ["r1", "r2", "r3"])[0] for k in keys]
    assert not router._pending_requests_by_id


def test_rank_replicas_pure_function() -> None:
    rids = [f"r{i}" for i in range(6)]
    order = rendezvous_order("k", rids)
    h = order[0]
    # Within the margin: home, two more single choices, then the rest as one group.
    groups = rank_replicas("k", rids, {r: 0 for r in rids} | {h: 8}, 16, 8)
    assert groups == [[h], [order[1]], [order[2]], order[3:]]
    # Over the margin: home last, the other replicas keep their rendezvous order.
    groups = rank_replicas("k", rids, {h: 9}, 16, 8)
    assert groups == [[h], [order[1]], [order[2]], order[3:]]  # only home known: no least
    groups = rank_replicas("k", rids, {h: 9, order[4]: 0}, 16, 8)
    assert groups == [[order[1]], [order[2]], [order[3]], [order[4], order[5]], [h]]
    # Home full (per-replica caps); everything full: one group, Serve probes them all.
    caps = {r: 2 for r in rids}
    assert rank_replicas("k", rids, {h: 2}, caps, 100)[0] == [order[1]]
    assert rank_replicas("k", rids, dict.fromkeys(rids, 2), caps, 100) == [order]
    assert rank_replicas("k", rids, {}, 16, 8, ordered_choices=1) == [[h], order[1:]]
    assert rank_replicas("k", [], {}, 16, 8) == []
    assert rank_replicas(None, rids, {}, 16, 8) == [rids]


def test_ten_thousand_rankings() -> None:
    rids = [f"replica-{i}" for i in range(8)]
    lens = {r: i for i, r in enumerate(rids)}
    homes = Counter(rank_replicas(f"k{i}", rids, lens, 16, 8)[0][0] for i in range(10_000))
    assert sum(homes.values()) == 10_000


# --- fallbacks ------------------------------------------------------------------------------

async def test_missing_key_falls_back_to_power_of_two_over_all_candidates() -> None:
    router = make_router()
    await with_replicas(router, replicas("r1", "r2", "r3", "r4"))
    seen: set[str] = set()
    for i in range(200):
        groups = ids(await router.choose_replicas(router._replicas_list, request(None, n=i)))
        assert len(groups) == 1 and len(groups[0]) == 2 and len(set(groups[0])) == 2
        seen.update(groups[0])
    assert seen == {"r1", "r2", "r3", "r4"}
    assert router.routed_without_key == 200 and router.routed_with_key == 0
    assert len((await router.choose_replicas(router._replicas_list, None))[0]) == 2
    assert await router.choose_replicas([], request("k")) == []


async def test_dict_argument_routes_like_an_object() -> None:
    router = make_router()
    await with_replicas(router, replicas("r1", "r2", "r3"))
    for i in range(50):
        as_obj = ids(await router.choose_replicas(router._replicas_list, request(f"k{i}")))
        as_dict = ids(await router.choose_replicas(router._replicas_list,
                                                   request(f"k{i}", as_dict=True)))
        assert as_obj == as_dict


class Exploding:
    @property
    def affinity_key(self) -> str:
        raise RuntimeError("boom")


async def test_errors_inside_never_raise_and_fall_back_to_all_candidates() -> None:
    router = make_router()
    fleet = replicas("r1", "r2", "r3")
    await with_replicas(router, fleet)

    broken = request("k")
    broken.args = [Exploding()]
    groups = await router.choose_replicas(router._replicas_list, broken)
    assert groups == [router._replicas_list]

    no_id = SimpleNamespace(max_ongoing_requests=4)  # a replica without replica_id
    groups = await router.choose_replicas([*fleet, no_id], request("k"))
    assert groups == [[*fleet, no_id]]

    # Not a real PendingRequest (no routing_context, metadata): still routed by its key.
    odd = SimpleNamespace(args=[{"affinity_key": "k"}], kwargs={})
    groups = await router.choose_replicas(fleet, odd)
    assert ids(groups) == [[r] for r in rendezvous_order("k", ["r1", "r2", "r3"])]
    assert router.errors == 2


def test_bad_router_kwargs_do_not_raise() -> None:
    router = make_router(imbalance_margin="lots", ordered_choices=0, surprise=1)
    assert router.imbalance_margin == DEFAULT_IMBALANCE_MARGIN
    assert router.ordered_choices >= 1
    assert make_router(imbalance_margin=2.5).imbalance_margin == 2.5


# --- Serve config ---------------------------------------------------------------------------

class _BlockIris(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: Any, target: Any = None) -> None:
        if name == "deployments" or name.startswith(("deployments.", "handlers")):
            raise ImportError(f"blocked: {name}")
        return None


def test_request_router_config_pickles_the_module_by_value(monkeypatch: pytest.MonkeyPatch) \
        -> None:
    config = RequestRouterConfig(
        request_router_class="deployments.router:ImageAffinityRouter",
        request_router_kwargs={"imbalance_margin": 4},
    )
    payload = config.get_serialized_request_router_cls()
    # Load it where Iris is not importable (as in an ingress replica without Iris on the path).
    for name in [m for m in sys.modules if m == "deployments" or m.startswith("deployments.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "meta_path", [_BlockIris(), *sys.meta_path])
    restored = RequestRouterConfig.from_serialized_request_router_cls(
        {"request_router_class": config.request_router_class,
         "request_router_kwargs": config.request_router_kwargs}, payload)
    cls = restored.get_request_router_class()
    assert cls.__name__ == "ImageAffinityRouter"
    router = cls(deployment_id=DEPLOYMENT, handle_source=DeploymentHandleSource.REPLICA)
    router.initialize_state(**restored.request_router_kwargs)
    assert router.imbalance_margin == 4

