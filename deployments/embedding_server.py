"""EmbeddingServer: the image-text encoder (CLIP, SigLIP) on vLLM's pooling runner, one engine
per replica (EncoderHost), kept alive like the chat engine (deployments.supervisor), answering
with vLLM's own embedding code (handlers.encoder). With deployments.encoder_in_ingress the
same EncoderHost runs inside ChatIngress instead."""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field
from typing import Any

from ray import serve

from deployments.contract import ImagePixels
from deployments.logs import behind_the_ingress, keep_serve_log_handlers, quiet_client_errors
from deployments.supervisor import EngineReplica, Supervisor
from handlers.config import EncoderSettings, IrisConfig
from handlers.cpu_affinity import engine_process_cores, move_to, pinned, to_replica_cores
from handlers.encoder import Text, VllmEncoder, read_logit_scale
from handlers.errors import EngineUnavailable


@dataclass(frozen=True)
class EmbedBatch:
    """The items of one request, each a text (or token ids) or an image; answered in order."""

    items: list[Text | ImagePixels] = field(default_factory=list)
    dimensions: int | None = None


async def start_encoder(enc: EncoderSettings, cores: list[int]) -> VllmEncoder:
    """vLLM's encoder engine in this process; its processes start on `cores` (the engine's,
    [] where Iris does not place engines)."""
    with keep_serve_log_handlers(), pinned(cores):
        encoder = await VllmEncoder.start(enc)
    quiet_client_errors()
    return encoder


class EncoderHost:
    """One encoder engine in this process, kept alive (deployments.supervisor), and the calls
    it answers. Both layouts use it: the EmbeddingServer replica, and ChatIngress's own
    encoder (deployments.encoder_in_ingress)."""

    def __init__(self, supervisor: Supervisor[VllmEncoder], logit_scale: float | None) -> None:
        self._encoder = supervisor
        self._logit_scale = logit_scale

    @classmethod
    async def start(cls, config: IrisConfig, *, whole_process: bool) -> EncoderHost:
        """`whole_process`: this process moves to the engine's cores too (a replica of its
        own); else only the engine's processes go there (inside ChatIngress)."""
        assert config.encoder is not None
        enc, e = config.encoder, config.engine
        os.environ.update(enc.env)
        cores = engine_process_cores(e, dict(os.environ))
        if whole_process:
            # The whole replica, and so the engine processes it starts, on the CPU engine's
            # cores when Iris placed the chat engine's worker there (engine.cpu_cores; the
            # encoder's worker inherits the same VLLM_CPU_OMP_THREADS_BIND). The CPU tier's
            # one core is what embeddings of fresh images wait for (ingress, preprocessor and
            # this replica at ~10-15 ms each per image), while the engine's core idles unless
            # chat is busy (embed-fresh: docs/benchmarks.md).
            move_to(cores)
        supervisor = Supervisor(await start_encoder(enc, cores),
                                lambda: start_encoder(enc, cores),
                                stall_timeout_s=e.stall_timeout_s,
                                restart_attempts=e.restart_attempts)
        supervisor.watch()
        return cls(supervisor, read_logit_scale(enc.source))

    async def embed(self, batch: EmbedBatch) -> tuple[list[list[float]], int]:
        """(one vector per item, in order; prompt tokens). Texts go in one engine request,
        images in another, at once. Raises EngineUnavailable while the engine is down."""
        encoder = self._encoder.serving()
        texts = [(i, x) for i, x in enumerate(batch.items) if not isinstance(x, ImagePixels)]
        images = [(i, x) for i, x in enumerate(batch.items) if isinstance(x, ImagePixels)]
        try:
            (text_vectors, text_tokens), (image_vectors, image_tokens) = await asyncio.gather(
                encoder.embed_texts([t for _, t in texts], batch.dimensions),
                encoder.embed_images([(img.array, img.uuid) for _, img in images],
                                     batch.dimensions))
        except EngineUnavailable:
            self._encoder.died(encoder)
            raise
        self._encoder.progressed()
        out: list[list[float]] = [[] for _ in batch.items]
        for (i, _), vector in zip([*texts, *images], [*text_vectors, *image_vectors],
                                  strict=True):
            out[i] = vector
        return out, text_tokens + image_tokens

    def logit_scale(self) -> float | None:
        """CLIP's learned temperature from the checkpoint (moderation's calibration)."""
        return self._logit_scale

    async def check_health(self) -> None:
        await self._encoder.check_health()

    def ready(self) -> bool:
        return self._encoder.ready()

    def stats(self) -> dict[str, Any]:
        engine = self._encoder.engine
        return {"unfinished_requests": engine.num_unfinished(), "engine_pids": engine.pids(),
                "engine_state": self._encoder.state, "engine_restarts": self._encoder.restarts}

    async def shutdown(self) -> None:
        await self._encoder.shutdown()


@serve.deployment(name="EmbeddingServer")
class EmbeddingServer(EngineReplica):
    _host: EncoderHost

    async def __init__(self, config: IrisConfig) -> None:  # type: ignore[misc]  # Serve awaits it
        to_replica_cores()  # then to the engine's cores, with the engine (whole_process)
        self._host = await EncoderHost.start(config, whole_process=True)
        behind_the_ingress()

    async def embed(self, batch: EmbedBatch) -> tuple[list[list[float]], int]:
        return await self._host.embed(batch)

    async def logit_scale(self) -> float | None:
        return self._host.logit_scale()
