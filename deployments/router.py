"""ImageAffinityRouter: a Ray Serve request router that sends requests with the same affinity
key (OpenAI `prompt_cache_key`, else the conversation's first image hash) to the same
LLMServer replica, so that replica's vLLM prefix cache (which keys image blocks by the image's
hash) is hit again.

- Home replica: rendezvous (highest-random-weight) hashing of (key, replica unique id) with
  blake2b. Every ingress replica computes the same home with no shared state, and when a
  replica joins or leaves only ~1/N of the keys move.
- Load guard: when the home's cached queue length exceeds the least-loaded replica's by more
  than `imbalance_margin`, or the home is at its `max_ongoing_requests`, the request goes to
  the next replica in the key's rendezvous order that is not overloaded (so a hot key
  overflows to the same second replica from every ingress), and the diversion is counted.
- No key: Serve's power-of-two-choices (two random candidates, the shorter queue wins).

Serve calls `choose_replicas` in every process holding a handle to the deployment and uses
the ranked groups it returns: it tries each group in turn and, within a group, takes the
replica with the shortest queue under `max_ongoing_requests` (probing replicas whose cached
length is missing or full). The first groups here are single replicas, so that order is kept.

Serve pickles this module by value (RequestRouterConfig): it must stay self-contained
(standard library and ray imports only, nothing else from Iris).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import random
from collections.abc import Hashable, Mapping, Sequence
from typing import Any, TypeVar

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

logger = logging.getLogger("ray.serve")

DEFAULT_IMBALANCE_MARGIN = 8
# Leading single-replica groups (home + fallbacks in rendezvous order). Beyond these the
# remaining replicas form one group, so Serve probes them in parallel rather than one by one.
DEFAULT_ORDERED_CHOICES = 3
DIVERTED_METRIC = "iris_router_diverted_total"
# Longer keys are hashed once per request rather than once per replica.
MAX_KEY_CHARS = 256

Id = TypeVar("Id", bound=Hashable)


def affinity_key_of(pending_request: Any) -> str | None:
    """The request's affinity key: `args[0].affinity_key` (an object or a dict), else a
    `request` keyword argument's; None when absent, empty or not a string. A key longer
    than MAX_KEY_CHARS is replaced by its 128-bit blake2b digest."""
    args = getattr(pending_request, "args", None) or ()
    kwargs = getattr(pending_request, "kwargs", None) or {}
    arg = args[0] if args else kwargs.get("request")
    if arg is None:
        return None
    key = arg.get("affinity_key") if isinstance(arg, dict) else getattr(arg, "affinity_key", None)
    if isinstance(key, bytes):
        key = key.decode("utf-8", "replace")
    if not isinstance(key, str) or not key:
        return None
    if len(key) > MAX_KEY_CHARS:  # a client's prompt_cache_key may be long: hash it once
        digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=16)
        return "h:" + digest.hexdigest()
    return key


def rendezvous_score(key: str, replica_id: str) -> int:
    """Stable 64-bit weight of (key, replica): the same in every process (unlike hash())."""
    data = f"{key}\x00{replica_id}".encode("utf-8", "surrogatepass")
    digest = hashlib.blake2b(data, digest_size=8).digest()
    return int.from_bytes(digest, "big")


def rendezvous_order(key: str, replica_ids: Sequence[Id], name: Any = str) -> list[Id]:
    """Replica ids, best first, by rendezvous weight (`rendezvous_score`, ties by name);
    `name(id)` is the string hashed."""
    base = hashlib.blake2b(key.encode("utf-8", "surrogatepass") + b"\x00", digest_size=8)
    scored = []
    for rid in replica_ids:
        label = name(rid)
        h = base.copy()
        h.update(label.encode("utf-8", "surrogatepass"))
        # Equal-length big-endian digests compare like the integers.
        scored.append((h.digest(), label, rid))
    scored.sort(key=lambda s: (s[0], s[1]), reverse=True)
    return [s[2] for s in scored]


def rank_replicas(
    key: str | None,
    replica_ids: Sequence[Id],
    queue_lens: Mapping[Id, int | None],
    max_ongoing: Mapping[Id, int] | int,
    margin: float = DEFAULT_IMBALANCE_MARGIN,
    *,
    ordered_choices: int = DEFAULT_ORDERED_CHOICES,
    name: Any = str,
) -> list[list[Id]]:
    """Ranked groups of replica ids for a request with affinity `key`.

    `queue_lens` holds known queue lengths (missing or None = unknown), `max_ongoing` each
    replica's cap (or one cap for all). No key: one group of every replica. Otherwise the
    home (first in rendezvous order) leads unless it is overloaded: at its cap, or more than
    `margin` above the least-loaded non-full replica (unknown lengths count as not
    overloaded). Then come the other not-overloaded replicas in rendezvous order, the first
    `ordered_choices` groups holding one replica each and the rest of them one group, and
    last one group of the overloaded replicas (their cached length may be stale: Serve
    probes them before giving up). `name(id)` is the string hashed (default str)."""
    if not replica_ids:
        return []
    if key is None:
        return [list(replica_ids)]
    return rank_in_order(rendezvous_order(key, replica_ids, name), queue_lens, max_ongoing,
                         margin, ordered_choices)


def rank_in_order(
    order: Sequence[Id],
    queue_lens: Mapping[Id, int | None],
    max_ongoing: Mapping[Id, int] | int,
    margin: float,
    ordered_choices: int = DEFAULT_ORDERED_CHOICES,
) -> list[list[Id]]:
    """`rank_replicas` given the key's rendezvous order (home first)."""
    one_cap: int | None = None
    caps: Mapping[Id, int] = {}
    if isinstance(max_ongoing, int):
        one_cap = max_ongoing
    else:
        caps = max_ongoing
    least: int | None = None  # shortest known queue among replicas not at their cap
    for rid in order:
        q = queue_lens.get(rid)
        if q is not None and q < (caps[rid] if one_cap is None else one_cap) and (
            least is None or q < least
        ):
            least = q
    heads: list[Id] = []
    tail: list[Id] = []  # overloaded: at the cap, or more than `margin` above `least`
    for rid in order:
        q = queue_lens.get(rid)
        if q is not None and (
            q >= (caps[rid] if one_cap is None else one_cap)
            or (least is not None and q - least > margin)
        ):
            tail.append(rid)
        else:
            heads.append(rid)
    n = max(1, int(ordered_choices))
    groups = [[rid] for rid in heads[:n]]
    if heads[n:]:
        groups.append(heads[n:])
    if tail:
        groups.append(tail)
    return groups


def diversion_reason(groups: Sequence[Sequence[Id]], home: Id, queue_len: int | None,
                     max_ongoing: int) -> str | None:
    """Why `rank_replicas` put the home replica out of first place ("full" or
    "imbalance"), or None when the home leads."""
    if groups and groups[0] and groups[0][0] == home:
        return None
    return "full" if queue_len is not None and queue_len >= max_ongoing else "imbalance"


class ImageAffinityRouter(RequestRouter):
    """Affinity routing on `affinity_key` with a load guard; see the module docstring.

    Deliberately not FIFOMixin (it hands a free replica to the oldest pending request,
    whichever replica its key wants) nor LocalityMixin (locality would override the home).
    Request router kwargs: `imbalance_margin` (default 8), `ordered_choices` (default 3),
    `emit_metrics` (default True: the `iris_router_diverted_total` counter)."""

    imbalance_margin: float = DEFAULT_IMBALANCE_MARGIN
    ordered_choices: int = DEFAULT_ORDERED_CHOICES
    emit_metrics: bool = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.diverted = 0  # requests the load guard sent away from their home replica
        self.diverted_by_reason: dict[str, int] = {"full": 0, "imbalance": 0}
        self.routed_with_key = 0
        self.routed_without_key = 0
        self.errors = 0
        self._error_logged = False
        self._metric: Any = None  # None: not created yet; False: creation failed

    def initialize_state(
        self,
        imbalance_margin: float = DEFAULT_IMBALANCE_MARGIN,
        ordered_choices: int = DEFAULT_ORDERED_CHOICES,
        emit_metrics: bool = True,
        **unknown: Any,
    ) -> None:
        """Called by Serve with `request_router_kwargs`. Never raises: bad values are logged
        and replaced by the defaults."""
        if unknown:
            logger.warning("ImageAffinityRouter: ignoring unknown kwargs %s", sorted(unknown))
        try:
            margin = float(imbalance_margin)
            if margin < 0 or margin != margin:
                raise ValueError(margin)
            self.imbalance_margin = margin
        except (TypeError, ValueError):
            logger.warning("ImageAffinityRouter: bad imbalance_margin %r, using %s",
                           imbalance_margin, DEFAULT_IMBALANCE_MARGIN)
            self.imbalance_margin = DEFAULT_IMBALANCE_MARGIN
        try:
            choices = int(ordered_choices)
            if choices < 1:
                raise ValueError(choices)
            self.ordered_choices = choices
        except (TypeError, ValueError):
            logger.warning("ImageAffinityRouter: bad ordered_choices %r, using %s",
                           ordered_choices, DEFAULT_ORDERED_CHOICES)
            self.ordered_choices = DEFAULT_ORDERED_CHOICES
        self.emit_metrics = bool(emit_metrics)

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        try:
            return self._choose(candidate_replicas, pending_request)
        except Exception:
            self.errors += 1
            if not self._error_logged:
                self._error_logged = True
                logger.exception("ImageAffinityRouter: routing failed; falling back to all "
                                 "candidates (logged once)")
            try:
                return [list(candidate_replicas)] if candidate_replicas else []
            except Exception:
                return []

    def _choose(
        self,
        candidates: list[RunningReplica],
        pending_request: PendingRequest | None,
    ) -> list[list[RunningReplica]]:
        if pending_request is not None:
            # Back off between rounds once every group has failed. Serve's routing loop
            # retries immediately, probing again, unless a mixin set this flag.
            with contextlib.suppress(Exception):
                pending_request.routing_context.should_backoff = True
        if not candidates:
            return []
        key = affinity_key_of(pending_request) if pending_request is not None else None
        if key is None:
            self.routed_without_key += 1
            return [power_of_two(candidates)]
        self.routed_with_key += 1

        cache = self._replica_queue_len_cache
        by_id: dict[str, RunningReplica] = {}
        queue_lens: dict[str, int | None] = {}
        caps: dict[str, int] = {}
        for r in candidates:
            rid = r.replica_id
            uid = rid.unique_id
            by_id[uid] = r
            queue_lens[uid] = cache.get(rid)  # None when unknown or stale
            caps[uid] = r.max_ongoing_requests
        order = rendezvous_order(key, list(by_id))
        groups = rank_in_order(order, queue_lens, caps, self.imbalance_margin,
                               self.ordered_choices)
        home = order[0]
        reason = diversion_reason(groups, home, queue_lens[home], caps[home])
        if reason is not None:
            self._count_diversion(pending_request, reason)
        return [[by_id[uid] for uid in group] for group in groups]

    def _fulfill_next_pending_request(
        self,
        replica: RunningReplica,
        request_metadata: Any = None,
    ) -> None:
        """Give `replica` to the request it was chosen for: the pending request carrying
        this very `request_metadata` object.

        Serve's base version (used without FIFOMixin) looks the request up by
        `internal_request_id`, which every handle call made while serving one ingress
        request shares (it comes from the request context), and it indexes only the first
        of them. With two such calls pending at once (e.g. `asyncio.gather` of two
        `chat.remote`), it hands the second call's replica to the first and then finds
        nothing for the second, whose routing task then retries forever: the call hangs.
        Serve's own PendingRequest keeps one RequestMetadata object per handle call."""
        try:
            found = self._pending_requests_by_id.get(request_metadata.internal_request_id)
            if found is None or found.metadata is not request_metadata or found.future.done():
                found = next(
                    (pr for pr in self._pending_requests_to_fulfill
                     if pr.metadata is request_metadata and not pr.future.done()),
                    None,
                )
            if found is None:
                return
            self._cancel_routing_task_for_pending_request(found)
            self._record_queue_wait_time(found)
            found.future.set_result(replica)
            if self._pending_requests_by_id.get(request_metadata.internal_request_id) is found:
                self._remove_pending_request_from_indices(found)
        except Exception:
            logger.warning("ImageAffinityRouter: fulfilling by request failed; using Serve's",
                           exc_info=True)
            super()._fulfill_next_pending_request(replica, request_metadata)

    def _count_diversion(self, pending_request: PendingRequest | None, reason: str) -> None:
        # Count a request once, even when Serve calls choose_replicas again after a backoff.
        ctx = getattr(pending_request, "routing_context", None)
        if ctx is not None:
            if getattr(ctx, "iris_diversion_counted", False):
                return
            with contextlib.suppress(Exception):  # best effort
                ctx.iris_diversion_counted = True
        self.diverted += 1
        self.diverted_by_reason[reason] = self.diverted_by_reason.get(reason, 0) + 1
        if not self.emit_metrics:
            return
        try:
            if self._metric is None:
                self._metric = False
                from ray.serve import metrics

                self._metric = metrics.Counter(
                    DIVERTED_METRIC,
                    description="Requests with an affinity key that the router sent away from "
                    "their home replica (reason: full or imbalance).",
                    tag_keys=("reason",),
                )
            if self._metric:
                self._metric.inc(tags={"reason": reason})
        except Exception:
            if self._metric:
                return
            self._metric = False
            logger.warning("ImageAffinityRouter: %s metric unavailable", DIVERTED_METRIC,
                           exc_info=True)


def power_of_two(candidates: Sequence[RunningReplica]) -> list[RunningReplica]:
    """Serve's default choice: two distinct random candidates (Serve takes the shorter
    queue of the two), or the only one."""
    if len(candidates) <= 2:
        chosen = list(candidates)
        random.shuffle(chosen)
        return chosen
    return random.sample(list(candidates), 2)
