"""The ingress's side of /v1/embeddings and /v1/moderations: images prepared for the encoder
(its own resize rule) by the same fetcher and preprocessor as chat, items sent to the
EmbeddingServer deployment (or the encoder in this replica, deployments.encoder_in_ingress),
answers built in OpenAI's shapes."""

from __future__ import annotations

from typing import Any

from ray.serve.handle import DeploymentHandle

from deployments.contract import ImagePixels
from deployments.embedding_server import EmbedBatch, EncoderHost
from deployments.images import ImagePreparer
from deployments.ray_errors import client_error
from deployments.retry import retrying
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


class EncoderClient:
    def __init__(self, config: IrisConfig, encoder: DeploymentHandle | EncoderHost,
                 images: ImagePreparer) -> None:
        assert config.encoder is not None
        self._cfg = config
        self.model_id = config.encoder.id
        self._encoder = encoder
        self._images = images
        self._scorer: Scorer | None = None

    async def ready(self) -> None:
        """Raises unless the encoder (here, or an EmbeddingServer replica) is serving."""
        if not isinstance(self._encoder, EncoderHost):
            await self._encoder.ready.remote()
        elif not self._encoder.ready():
            raise EngineUnavailable.restarting()

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
        return await self._call_encoder(EmbedBatch(batch, dimensions), deadline)

    async def _call_encoder(self, request: EmbedBatch, deadline: float
                            ) -> tuple[list[list[float]], int]:
        """An embedding is a pure function of its input: when the EmbeddingServer replica
        dies under the call, another one (or its replacement) answers it, within the
        request's deadline. The encoder in this replica is called directly (its
        Supervisor brings a dead engine back)."""
        encoder = self._encoder
        if isinstance(encoder, EncoderHost):
            return await encoder.embed(request)
        try:
            result: tuple[list[list[float]], int] = await retrying(
                "encoder", lambda: encoder.embed.remote(request), deadline)
        except Exception as exc:
            raise client_error(exc) from None
        return result

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
            scale = logit_scale(settings, self._encoder.logit_scale()
                                if isinstance(self._encoder, EncoderHost)
                                else await self._encoder.logit_scale.remote())
            head = load_head(settings.head, len(vectors[0])) if settings.head else None
            self._scorer = Scorer(settings, dict(zip(texts, vectors, strict=True)), scale, head)
        return self._scorer
