"""The ingress's side of /v1/embeddings and /v1/moderations: images prepared for the encoder
(its own resize rule) by the same fetcher and preprocessor as chat, items sent to the encoder,
answers built in OpenAI's shapes.

The encoder is one interface for both layouts, as the chat engine is (deployments/backend.py):
- InProcessEncoder: the engine runs in the ingress replica (deployments.encoder_in_ingress),
  called directly; its Supervisor brings a dead engine back.
- ServeEncoder: the engine runs in the EmbeddingServer deployment, reached through its
  handle; a call whose replica died before answering goes again."""

from __future__ import annotations

from typing import Any, Protocol

from ray.serve.handle import DeploymentHandle

from deployments.contract import ImagePixels
from deployments.embedding_server import EmbedBatch, EncoderHost
from deployments.images import ImagePreparer
from deployments.ray_errors import client_error, replica_gone
from deployments.retry import retrying
from deployments.supervisor import require_ready
from handlers.config import IrisConfig
from handlers.embeddings import embedding_response, parse_embedding_request
from handlers.encoder import Text
from handlers.errors import EngineUnavailable, InvalidRequest, ModelNotFound
from handlers.moderation_head import load_head
from handlers.moderation_request import parse_moderation_request
from handlers.moderation_scoring import (
    Scorer,
    logit_scale,
    moderation_response,
    new_moderation_id,
    prompt_texts,
)
from handlers.protocol import ImageRef

OPENAI_MODERATION_MODELS = ("omni-moderation-", "text-moderation-")


class Encoder(Protocol):
    async def ready(self) -> None:
        """Raises unless the encoder can serve now."""

    async def embed(self, batch: EmbedBatch, deadline: float) -> tuple[list[list[float]], int]:
        """(one vector per item, in order; prompt tokens); raises IrisError."""

    async def logit_scale(self) -> float | None:
        """CLIP's learned temperature (moderation's calibration)."""

    async def check_health(self) -> None:
        """Raises when the replica holding the engine should be replaced (a no-op when the
        engine lives in EmbeddingServer)."""

    def stats(self) -> dict[str, Any]:
        """The engine's load and counters when it runs in this replica, else {}."""

    async def shutdown(self) -> None: ...


class InProcessEncoder:
    def __init__(self, host: EncoderHost) -> None:
        self._host = host

    async def ready(self) -> None:
        require_ready(self._host)

    async def embed(self, batch: EmbedBatch, deadline: float) -> tuple[list[list[float]], int]:
        return await self._host.embed(batch)

    async def logit_scale(self) -> float | None:
        return self._host.logit_scale()

    async def check_health(self) -> None:
        await self._host.check_health()

    def stats(self) -> dict[str, Any]:
        return self._host.stats()

    async def shutdown(self) -> None:
        await self._host.shutdown()


class ServeEncoder:
    def __init__(self, handle: DeploymentHandle) -> None:
        self._handle = handle

    async def ready(self) -> None:
        await self._handle.ready.remote()

    async def embed(self, batch: EmbedBatch, deadline: float) -> tuple[list[list[float]], int]:
        """An embedding is a pure function of its input: when the EmbeddingServer replica
        dies under the call, another one (or its replacement) answers it, within the
        request's deadline."""
        try:
            result: tuple[list[list[float]], int] = await retrying(
                "encoder", lambda: self._handle.embed.remote(batch), deadline)
        except Exception as exc:
            if replica_gone(exc):
                raise EngineUnavailable.restarting() from None
            raise client_error(exc) from None
        return result

    async def logit_scale(self) -> float | None:
        scale: float | None = await self._handle.logit_scale.remote()
        return scale

    async def check_health(self) -> None:
        pass  # Serve checks EmbeddingServer's replicas itself

    def stats(self) -> dict[str, Any]:
        return {}

    async def shutdown(self) -> None:
        pass


async def start_encoder_backend(config: IrisConfig, handle: DeploymentHandle | None
                                ) -> Encoder | None:
    """The encoder for this layout: one in this replica (deployments.encoder_in_ingress),
    EmbeddingServer's handle if the app has one, or none when no encoder is served."""
    if config.encoder is None:
        return None
    if config.deployments.encoder_in_ingress:
        return InProcessEncoder(await EncoderHost.start(config, whole_process=False))
    return ServeEncoder(handle) if handle is not None else None


class EncoderClient:
    def __init__(self, config: IrisConfig, encoder: Encoder, images: ImagePreparer) -> None:
        assert config.encoder is not None
        self._cfg = config
        self.model_id = config.encoder.id
        self._encoder = encoder
        self._images = images
        self._scorer: Scorer | None = None

    async def ready(self) -> None:
        """Raises unless the encoder (here, or an EmbeddingServer replica) is serving."""
        await self._encoder.ready()

    def _check_model(self, model: str | None, *, moderation: bool = False) -> None:
        # Clients written for OpenAI name its moderation models: they mean this encoder.
        if moderation and (model is None or model.startswith(OPENAI_MODERATION_MODELS)):
            return
        if model != self.model_id:
            raise ModelNotFound(f"The model {model!r} does not exist.", param="model")

    async def _embed(self, items: list[Text | ImageRef], dimensions: int | None,
                     deadline: float) -> tuple[list[list[float]], int]:
        """Vectors in item order. Images are prepared for the encoder first, and their
        pixels sent by value (contract.ImagePixels)."""
        prepared = iter(await self._images.prepare_all(
            [x for x in items if isinstance(x, ImageRef)], deadline, target="encoder"))
        batch: list[Text | ImagePixels] = []
        for x in items:
            if isinstance(x, ImageRef):
                img = next(prepared)
                batch.append(ImagePixels(img.pixels, img.uuid))
            else:
                batch.append(x)
        return await self._encoder.embed(EmbedBatch(batch, dimensions), deadline)

    async def embeddings(self, body: Any, deadline: float) -> dict[str, Any]:
        req = parse_embedding_request(body, self._cfg.limits.max_embedding_inputs)
        self._check_model(req.model)
        if len(req.images) > self._cfg.limits.max_images_per_request:
            raise InvalidRequest(
                f"The request has {len(req.images)} images; at most "
                f"{self._cfg.limits.max_images_per_request} are allowed.", param="input",
                code="too_many_images")
        items: list[Text | ImageRef] = []
        for item in req.items:
            if item.kind == "image":
                assert item.url is not None
                items.append(ImageRef(item.url, item.detail or "auto", item.param))
            elif item.kind == "tokens":
                items.append(list(item.tokens or ()))
            else:
                items.append(item.text or "")
        vectors, tokens = await self._embed(items, req.dimensions, deadline)
        return embedding_response(vectors, self.model_id, tokens, req.encoding_format)

    async def moderations(self, body: Any, deadline: float) -> dict[str, Any]:
        req = parse_moderation_request(body, self._cfg.limits.max_embedding_inputs)
        self._check_model(req.model, moderation=True)
        scorer = await self._moderation_scorer(deadline)
        parts = [p for inp in req.inputs for p in inp.parts]
        items: list[Text | ImageRef] = [
            ImageRef(p.url or "", p.detail or "auto", p.param) if p.kind == "image"
            else p.text or "" for p in parts]
        vectors, _ = await self._embed(items, None, deadline)
        by_part = iter(zip(parts, vectors, strict=True))
        results = [scorer.moderate([(p.kind, v) for p, v in
                                    (next(by_part) for _ in inp.parts)]) for inp in req.inputs]
        return moderation_response(results, self.model_id, new_moderation_id())

    async def _moderation_scorer(self, deadline: float) -> Scorer:
        """The category prompts' embeddings, made once (on the first moderation request)."""
        if self._scorer is None:
            settings = self._cfg.moderation
            texts = prompt_texts(settings)
            vectors, _ = await self._embed(list(texts), None, deadline)
            scale = logit_scale(settings, await self._encoder.logit_scale())
            head = load_head(settings.head, len(vectors[0])) if settings.head else None
            self._scorer = Scorer(settings, dict(zip(texts, vectors, strict=True)), scale, head)
        return self._scorer
