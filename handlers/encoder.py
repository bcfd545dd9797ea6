"""An image-text encoder (CLIP, SigLIP) on vLLM's pooling runner, behind a small interface,
serving embeddings with vLLM's own embedding code (as VllmChatEngine does chat).

Pitfalls of vLLM 0.32 this handles: an engine either generates or pools, so the encoder has
an engine of its own; CLIP takes one image or one text per item, never both; text sent as
chat `messages` loses its special tokens (last-token pooling then lands on the wrong token),
so text goes as `input` strings, which keep them; images go as one chat conversation each,
with Iris's pixels as an `image_pil` part whose uuid names the exact pixels (vLLM caches by
it: a reused uuid would return another image's embedding)."""

from __future__ import annotations

import functools
import json
import math
from argparse import Namespace
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from handlers.config import EncoderSettings
from handlers.engine import InProcessEngine, extra_cli_args, parse_vllm_args, start_async_llm
from handlers.errors import InvalidRequest

Text = str | list[int]  # a string, or token ids


def encoder_cli_args(enc: EncoderSettings) -> list[str]:
    args = [
        "--model", enc.source,
        "--served-model-name", enc.id,
        "--runner", "pooling",
        "--dtype", enc.dtype,
        "--limit-mm-per-prompt", '{"image": 1}',
        "--max-num-seqs", str(enc.max_num_seqs),
    ]
    if enc.max_model_len:
        args += ["--max-model-len", str(enc.max_model_len)]
    if enc.kv_cache_memory_bytes:
        args += ["--kv-cache-memory-bytes", str(enc.kv_cache_memory_bytes)]
    return args + extra_cli_args(enc.extra_args)


def parse_encoder_args(enc: EncoderSettings) -> Namespace:
    return parse_vllm_args(encoder_cli_args(enc), enc.extra_args, "encoder.extra_args")


def read_logit_scale(source: str) -> float | None:
    """CLIP's learned temperature, from the checkpoint (vLLM drops it when it loads)."""
    path = Path(source) / "model.safetensors"
    if not path.exists():
        return None
    from safetensors import safe_open

    with safe_open(str(path), "np") as f:
        if "logit_scale" not in f.keys():
            return None
        return float(math.exp(float(f.get_tensor("logit_scale"))))


@functools.cache
def _embedding_request() -> Any:
    """vLLM's EmbeddingRequest (a union) as a validator, built once: building it took an
    eighth of the encoder replica's CPU time per image when it was built per call."""
    from pydantic import TypeAdapter
    from vllm.entrypoints.pooling.embed.protocol import EmbeddingRequest

    return TypeAdapter(EmbeddingRequest)


class VllmEncoder(InProcessEngine):
    """An in-process vLLM AsyncLLM on the pooling runner plus vLLM's ServingEmbedding."""

    def __init__(self, engine: Any, serving: Any, model_id: str) -> None:
        super().__init__(engine)
        self._serving = serving
        self._model = model_id

    @classmethod
    async def start(cls, enc: EncoderSettings) -> VllmEncoder:
        engine, state = await start_async_llm(parse_encoder_args(enc))
        return cls(engine, state.serving_embedding, enc.id)

    async def embed_texts(self, texts: Sequence[Text], dimensions: int | None
                          ) -> tuple[list[list[float]], int]:
        """One embedding per text, in order, with special tokens (as the model was trained)."""
        self._check_dimensions(dimensions)
        if not texts:
            return [], 0
        return await self._call({"model": self._model, "input": list(texts),
                                 "dimensions": dimensions})

    async def embed_images(self, images: Sequence[tuple[np.ndarray, str]],
                           dimensions: int | None) -> tuple[list[list[float]], int]:
        """One embedding per image (HxWx3 uint8 at the encoder's size, and its uuid)."""
        self._check_dimensions(dimensions)
        if not images:
            return [], 0
        conversations = [[{"role": "user", "content": [
            {"type": "image_pil", "image_pil": Image.fromarray(arr, "RGB"), "uuid": uuid}]}]
            for arr, uuid in images]
        return await self._call({"model": self._model, "messages": conversations,
                                 "dimensions": dimensions})

    def _check_dimensions(self, dimensions: int | None) -> None:
        # vLLM refuses this too, but without naming the field.
        if dimensions is not None and not self._engine.model_config.is_matryoshka:
            raise InvalidRequest(
                f"Model '{self._model}' does not support `dimensions` (it has no Matryoshka "
                "embeddings): leave it unset to get the model's full-size vectors.",
                param="dimensions")

    async def _call(self, body: dict[str, Any]) -> tuple[list[list[float]], int]:
        from pydantic import ValidationError
        from vllm.entrypoints.serve import create_error_response

        try:
            request = _embedding_request().validate_python(body)
            response = await self._serving(request, None)
        except ValidationError as exc:
            raise InvalidRequest(f"The encoder refused the input: {exc.errors()[0]['msg']}",
                                 param="input") from None
        except Exception as exc:  # vLLM raises its client errors (too long, dimensions)
            self._raise(create_error_response(exc).model_dump(), exc)
        payload = json.loads(bytes(response.body))
        if "error" in payload:
            self._raise(payload, None)
        data = sorted(payload["data"], key=lambda d: int(d["index"]))
        return [list(map(float, d["embedding"])) for d in data], int(
            payload["usage"]["prompt_tokens"])
