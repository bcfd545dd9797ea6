"""vLLM's async engine and its own OpenAI chat serving, behind a small interface.

We reuse vLLM's `OpenAIServingChat` (templating, sampling params, logprobs, tools,
response_format, usage) instead of rewriting it. The only thing we change is how
images arrive: as `image_pil` parts carrying a content uuid, already at target size.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Sequence
from typing import Any, Literal, Protocol

import numpy as np
from PIL import Image
from pydantic import ValidationError

from handlers.config import IrisConfig
from handlers.errors import InvalidRequest, IrisError, error_from_openai_payload, to_error
from handlers.protocol import validation_message

# A child of Serve's logger: in a replica, its lines go to the replica log with the request id.
logger = logging.getLogger("ray.serve.iris.engine")

Kind = Literal["json", "sse", "error"]
Event = tuple[Kind, Any]


class ChatEngine(Protocol):
    """What LLMServer needs from an engine."""

    async def chat(
        self, body: dict[str, Any], images: Sequence[tuple[np.ndarray, str]]
    ) -> AsyncIterator[Event]: ...

    async def check_health(self) -> None: ...

    def num_unfinished(self) -> int: ...


def engine_cli_args(cfg: IrisConfig) -> list[str]:
    """vLLM server arguments for this config (the same flags `vllm serve` takes)."""
    e = cfg.engine
    args = [
        "--model", cfg.model.source,
        "--served-model-name", cfg.model.id,
        "--max-model-len", str(e.max_model_len),
        "--dtype", e.dtype,
        "--tensor-parallel-size", str(e.tensor_parallel_size),
        "--pipeline-parallel-size", str(e.pipeline_parallel_size),
        "--gpu-memory-utilization", str(e.gpu_memory_utilization),
        "--max-num-seqs", str(e.max_num_seqs),
        "--limit-mm-per-prompt", f'{{"image": {e.limit_images_per_prompt}}}',
        "--disable-log-stats",
    ]
    if e.enforce_eager:
        args.append("--enforce-eager")
    if e.tensor_parallel_size * e.pipeline_parallel_size > 1:
        # Shards run as Ray actors inside the replica's placement group (see engine_placement).
        args += ["--distributed-executor-backend", "ray"]
    return args


def engine_placement(cfg: IrisConfig) -> dict[str, Any]:
    """Placement group for one engine replica: the replica actor's bundle, then one bundle
    per model shard (tensor x pipeline parallel). Tensor-parallel shards share a node
    (STRICT_PACK); pipeline stages may span nodes (PACK). CPU-only configs take the same
    path with CPU bundles, so tests exercise it."""
    e, d = cfg.engine, cfg.deployments.llm
    shards = e.tensor_parallel_size * e.pipeline_parallel_size
    cpus = d.num_cpus if d.num_cpus is not None else 1.0
    gpus = d.num_gpus or 0.0
    if shards == 1:
        bundles = [{"CPU": cpus, **({"GPU": gpus} if gpus else {})}]
    else:
        shard = {"CPU": 1.0, **({"GPU": 1.0} if gpus else {})}
        bundles = [{"CPU": cpus}] + [dict(shard) for _ in range(shards)]
    strategy = "STRICT_PACK" if e.pipeline_parallel_size == 1 else "PACK"
    return {"placement_group_bundles": bundles, "placement_group_strategy": strategy}


def attach_images(
    messages: list[dict[str, Any]], images: Sequence[tuple[Any, str]]
) -> list[dict[str, Any]]:
    """Replace image_url parts, in order, with vLLM `image_pil` parts (pixels + uuid)."""
    it = iter(images)
    out: list[dict[str, Any]] = []
    for msg in messages:
        content = msg.get("content")
        if isinstance(content, list):
            new_content = []
            for part in content:
                if isinstance(part, dict) and part.get("type") == "image_url":
                    pil, uuid = next(it)
                    part = {"type": "image_pil", "image_pil": pil, "uuid": uuid}
                new_content.append(part)
            msg = {**msg, "content": new_content}
        out.append(msg)
    if next(it, None) is not None:
        raise IrisError("More images than image parts.")
    return out


# vLLM picks its media connector by this name (VLLM_MEDIA_CONNECTOR) for every URL in a request.
NO_FETCH_CONNECTOR = "iris-no-fetch"
ENGINE_FETCH_REFUSED = "The engine fetches no media: images reach it through Iris's fetcher."


def refuse_engine_fetches() -> None:
    """A second wall behind the ingress's content-part rules: vLLM's own media loading (http,
    data: and file URLs) refuses everything in this process, so nothing that slips past
    them can make the engine fetch a URL itself. Call before the engine starts."""
    from vllm.multimodal.media import MEDIA_CONNECTOR_REGISTRY, MediaConnector

    class NoFetchMediaConnector(MediaConnector):
        def load_from_url(self, url: str, media_io: Any, *, fetch_timeout: int | None = None
                          ) -> Any:
            raise ValueError(ENGINE_FETCH_REFUSED)

        async def load_from_url_async(
            self, url: str, media_io: Any, *, fetch_timeout: int | None = None
        ) -> Any:
            raise ValueError(ENGINE_FETCH_REFUSED)

    MEDIA_CONNECTOR_REGISTRY.register(NO_FETCH_CONNECTOR)(NoFetchMediaConnector)
    os.environ["VLLM_MEDIA_CONNECTOR"] = NO_FETCH_CONNECTOR


class VllmChatEngine:
    """An in-process vLLM AsyncLLM plus vLLM's OpenAIServingChat."""

    def __init__(self, engine: Any, serving_chat: Any) -> None:
        self._engine = engine
        self._chat = serving_chat

    @classmethod
    async def start(cls, cfg: IrisConfig) -> VllmChatEngine:
        from starlette.datastructures import State
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.entrypoints.launchers.api_server.app_state import init_app_state
        from vllm.entrypoints.launchers.cli_args import (
            make_arg_parser,
            validate_parsed_serve_args,
        )
        from vllm.usage.usage_lib import UsageContext
        from vllm.utils.argparse_utils import FlexibleArgumentParser
        from vllm.v1.engine.async_llm import AsyncLLM

        refuse_engine_fetches()
        args = make_arg_parser(FlexibleArgumentParser()).parse_args(engine_cli_args(cfg))
        for key, value in cfg.engine.extra_args.items():
            setattr(args, key.replace("-", "_"), value)
        validate_parsed_serve_args(args)
        engine_args = AsyncEngineArgs.from_cli_args(args)
        vllm_config = engine_args.create_engine_config(
            usage_context=UsageContext.OPENAI_API_SERVER
        )
        engine = AsyncLLM.from_vllm_config(
            vllm_config,
            usage_context=UsageContext.OPENAI_API_SERVER,
            enable_log_requests=False,
            disable_log_stats=True,
        )
        state = State()
        await init_app_state(engine, state, args, await engine.get_supported_tasks())
        return cls(engine, state.openai_serving_chat)

    async def check_health(self) -> None:
        await self._engine.check_health()

    def num_unfinished(self) -> int:
        """Requests the engine still holds (running or waiting)."""
        return int(self._engine.get_num_unfinished_requests())

    def shutdown(self) -> None:
        self._engine.shutdown()

    async def chat(
        self, body: dict[str, Any], images: Sequence[tuple[np.ndarray, str]]
    ) -> AsyncIterator[Event]:
        from vllm.entrypoints.openai.chat_completion.protocol import (
            ChatCompletionRequest,
            ChatCompletionResponse,
        )
        from vllm.entrypoints.serve import create_error_response

        pils = [(Image.fromarray(arr, "RGB"), uuid) for arr, uuid in images]
        body = {**body, "messages": attach_images(body["messages"], pils)}
        try:
            request = ChatCompletionRequest.model_validate(body)
        except ValidationError as exc:
            msg, param = validation_message(exc)
            yield "error", InvalidRequest(msg, param=param)
            return
        try:
            result = await self._chat.create_chat_completion(request, None)
        except Exception as exc:  # vLLM raises some client errors instead of returning
            err = create_error_response(exc)
            yield "error", _from_vllm_error(err, exc)
            return
        if isinstance(result, ChatCompletionResponse):
            yield "json", result.model_dump(mode="json", exclude_none=True)
            return
        if not hasattr(result, "__aiter__"):  # ErrorResponse
            yield "error", _from_vllm_error(result, None)
            return
        async for chunk in result:
            yield "sse", chunk


def _from_vllm_error(err: Any, exc: BaseException | None) -> IrisError:
    payload = err.model_dump() if hasattr(err, "model_dump") else {}
    info = payload.get("error", {})
    status = int(info.get("code") or 500)
    if status >= 500 and exc is not None:
        return to_error(exc)
    return error_from_openai_payload(status, payload)
