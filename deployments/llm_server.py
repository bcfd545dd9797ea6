"""LLMServer: one vLLM async engine per replica, serving chat with vLLM's own code."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import logging.handlers
import os
from collections.abc import AsyncIterator, Iterator
from typing import Any

import ray
from ray import serve

from deployments.preprocessor import PreparedImage
from deployments.ray_errors import client_error
from handlers.admission import Admission
from handlers.config import IrisConfig
from handlers.cpu_affinity import engine_process_cores, pinned
from handlers.engine import ChatEngine, Event, VllmChatEngine, engine_placement
from handlers.stream_batch import batch_sse


def llm_serve_options(cfg: IrisConfig) -> dict[str, Any]:
    """Serve options for LLMServer: the config's, plus the engine's environment."""
    opts = cfg.deployments.llm.serve_options()
    actor = opts.setdefault("ray_actor_options", {})
    # vLLM reads its settings from the environment of the replica process.
    actor["runtime_env"] = {"env_vars": dict(cfg.engine.env)}
    if "placement_group_bundles" not in opts:
        opts.update(engine_placement(cfg))
        if len(opts["placement_group_bundles"]) > 1:
            actor.pop("num_gpus", None)  # the shards' bundles hold the GPUs
    return opts


@contextlib.contextmanager
def keep_serve_log_handlers(name: str = "ray.serve") -> Iterator[None]:
    """vLLM configures logging with `dictConfig`, which closes every existing handler.
    Serve's replica logger writes through a MemoryHandler whose target a close drops:
    its records (with their request ids) would then pile up in memory, never written.
    Reattach the targets afterwards."""
    serve_logger = logging.getLogger(name)
    targets = [(h, h.target) for h in serve_logger.handlers
               if isinstance(h, logging.handlers.MemoryHandler)]
    try:
        yield
    finally:
        for handler, target in targets:
            if handler.target is None and target is not None:
                handler.setTarget(target)  # a closed FileHandler reopens on its next write


class EngineHost:
    """One vLLM engine in this process and the chat calls it answers: LLMServer's body, and
    ChatIngress's own engine with deployments.engine_in_ingress."""

    def __init__(
        self, engine: ChatEngine, batch_s: float, admission: Admission | None = None
    ) -> None:
        self._engine = engine
        self._batch_s = batch_s
        self._admission = admission

    @classmethod
    async def start(cls, config: IrisConfig, in_ingress: bool = False) -> EngineHost:
        """in_ingress: no Serve queue in front of this engine, so apply deployments.llm's
        max_ongoing_requests / max_queued_requests here."""
        os.environ.update(config.engine.env)
        # The engine's core process starts here and inherits these cores (engine.cpu_cores).
        cores = engine_process_cores(config.engine, dict(os.environ))
        with keep_serve_log_handlers(), pinned(cores):
            engine = await VllmChatEngine.start(config)
        llm = config.deployments.llm
        admission = (Admission(llm.max_ongoing_requests, llm.max_queued_requests)
                     if in_ingress and llm.max_ongoing_requests else None)
        return cls(engine, config.http.stream_batch_ms / 1000, admission)

    async def check_health(self) -> None:
        await self._engine.check_health()

    def stats(self) -> dict[str, int | str]:
        return {
            "unfinished_requests": self._engine.num_unfinished(),
            "node_id": ray.get_runtime_context().get_node_id(),
        }

    async def chat(
        self, body: dict[str, Any], images: list[PreparedImage]
    ) -> AsyncIterator[Event]:
        """Yields ("json", dict) | ("error", IrisError) | ("sse", str) events."""
        try:
            async with (self._admission.slot() if self._admission is not None
                        else contextlib.nullcontext()):
                # Pixels come straight from the preprocessor's object store entries.
                arrays = await asyncio.gather(*(img.ref for img in images)) if images else []
                pairs = [(arr, img.uuid) for arr, img in zip(arrays, images, strict=True)]
                async for event in batch_sse(self._engine.chat(body, pairs), self._batch_s):
                    yield event
        except Exception as exc:  # CancelledError is not an Exception: cancels propagate
            yield "error", client_error(exc)


@serve.deployment(name="LLMServer")
class LLMServer:
    async def __init__(self, config: IrisConfig) -> None:
        self._host = await EngineHost.start(config)

    async def check_health(self) -> None:
        await self._host.check_health()

    async def stats(self) -> dict[str, int | str]:
        return self._host.stats()

    async def chat(
        self, body: dict[str, Any], images: list[PreparedImage]
    ) -> AsyncIterator[Event]:
        """Yields ("json", dict) | ("error", IrisError) | ("sse", str) events."""
        async for event in self._host.chat(body, images):
            yield event
