"""vLLM's async engine and its own OpenAI chat serving, behind a small interface.

We reuse vLLM's `OpenAIServingChat` (templating, sampling params, logprobs, tools,
response_format, usage) instead of rewriting it. The only thing we change is how
images arrive: as `image_pil` parts carrying a content uuid, already at target size.
Errors are raised as IrisErrors, including the error chunk vLLM writes into a stream.
"""

from __future__ import annotations

import asyncio
import difflib
import json
import logging
import os
from argparse import Namespace
from collections.abc import Sequence
from contextlib import aclosing
from typing import Any, NoReturn

import numpy as np
from PIL import Image
from pydantic import ValidationError

from handlers.config import IrisConfig
from handlers.config_load import ConfigError
from handlers.errors import (
    EngineUnavailable,
    InvalidRequest,
    IrisError,
    error_from_openai_payload,
    to_error,
)
from handlers.events import EventStream, JsonAnswer, SseChunk
from handlers.protocol import validation_message
from handlers.reaper import alive, process_tree

# A child of Serve's logger: in a replica, its lines go to the replica log with the request id.
logger = logging.getLogger("ray.serve.iris.engine")

# vLLM writes a failure inside a stream as one of these, then [DONE].
_ERROR_CHUNK = 'data: {"error"'


def engine_cli_args(cfg: IrisConfig) -> list[str]:
    """vLLM server arguments for this config (the same flags `vllm serve` takes), with
    engine.extra_args last."""
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
        # usage.prompt_tokens_details.cached_tokens in every answer.
        "--enable-prompt-tokens-details",
    ]
    if e.enforce_eager:
        args.append("--enforce-eager")
    if e.tensor_parallel_size * e.pipeline_parallel_size > 1:
        # Shards run as Ray actors inside the replica's placement group (serve_options).
        args += ["--distributed-executor-backend", "ray"]
    if e.tool_call_parser:
        args += ["--enable-auto-tool-choice", "--tool-call-parser", e.tool_call_parser]
    return args + extra_cli_args(e.extra_args)


def extra_cli_args(extra: dict[str, Any]) -> list[str]:
    """engine.extra_args as command-line flags: {max_num_batched_tokens: 64} ->
    --max-num-batched-tokens 64; true -> the flag; false -> --no-flag; maps and lists as JSON."""
    out: list[str] = []
    for key, value in extra.items():
        flag = "--" + key.strip().lower().replace("_", "-")
        if value is True:
            out.append(flag)
        elif value is False:
            out.append("--no-" + flag[2:])
        elif value is not None:
            out += [flag, json.dumps(value) if isinstance(value, dict | list) else str(value)]
    return out


def parse_engine_args(cfg: IrisConfig) -> Namespace:
    """The config through vLLM's own argument parser: an unknown or ill-typed
    engine.extra_args entry stops the start with vLLM's message, naming the field."""
    return parse_vllm_args(engine_cli_args(cfg), cfg.engine.extra_args, "engine.extra_args")


def parse_vllm_args(argv: list[str], extra: dict[str, Any], where: str) -> Namespace:
    """`argv` (which ends with `extra` as flags, extra_cli_args) through `vllm serve`'s own
    parser; ConfigError naming `where` for a key vLLM does not know or a value it refuses."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    class RaisingParser(FlexibleArgumentParser):
        def error(self, message: str) -> NoReturn:
            raise ConfigError(f"{where}: vLLM refused the engine arguments: {message}")

    parser = make_arg_parser(RaisingParser(prog="iris-engine"))  # type: ignore[no-untyped-call]
    known = parser._option_string_actions
    for key in extra:
        flag = "--" + key.strip().lower().replace("_", "-")
        if flag not in known:
            close = difflib.get_close_matches(flag, list(known), n=1)
            hint = f"; did you mean {close[0][2:].replace('-', '_')}?" if close else ""
            raise ConfigError(f"{where}.{key} is not a vLLM engine argument{hint}")
    # `false` for a flag that has no --no- form (store_true) means: leave it off.
    argv = [a for a in argv if not (a.startswith("--no-") and a not in known
                                    and "--" + a[5:] in known)]
    args: Namespace = parser.parse_args(argv)
    validate_parsed_serve_args(args)
    return args


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


async def start_async_llm(args: Namespace, stat_loggers: Any = None) -> tuple[Any, Any]:
    """An in-process vLLM AsyncLLM from parsed CLI args, and vLLM's own serving objects for
    it (init_app_state's State: chat, embeddings, ... as the model supports)."""
    from starlette.datastructures import State
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.launchers.api_server.app_state import init_app_state
    from vllm.usage.usage_lib import UsageContext
    from vllm.v1.engine.async_llm import AsyncLLM

    refuse_engine_fetches()
    engine_args = AsyncEngineArgs.from_cli_args(args)
    vllm_config = await asyncio.to_thread(
        engine_args.create_engine_config, usage_context=UsageContext.OPENAI_API_SERVER)
    # In a thread: it blocks for the whole engine start (spawning and loading), and the
    # event loop must keep answering meanwhile (503s while an engine restarts).
    engine = await asyncio.to_thread(
        AsyncLLM.from_vllm_config,
        vllm_config,
        usage_context=UsageContext.OPENAI_API_SERVER,
        enable_log_requests=False,
        disable_log_stats=True,  # no periodic log lines; stat_loggers still run
        stat_loggers=stat_loggers,
    )
    state = State()
    await init_app_state(engine, state, args, await engine.get_supported_tasks())
    return engine, state


class InProcessEngine:
    """What the supervisor needs of an in-process AsyncLLM, chat or pooling."""

    def __init__(self, engine: Any) -> None:
        self._engine = engine
        self._failed = False
        # The core processes as started (psutil remembers each one's start time: a reused
        # pid is never taken for it).
        self._cores = process_tree(self.pids(), children=False)

    @property
    def errored(self) -> bool:
        """The engine is dead (its core process exited): nothing more will be served. Seen
        here the moment the process is gone, not only once vLLM's monitor thread has flagged
        it: a request sent in between would wait on a dead engine."""
        return self._failed or bool(self._engine.errored) or not all(map(alive, self._cores))

    def fail_in_flight(self) -> None:
        """Ends every request still waiting on this dead engine with vLLM's EngineDeadError
        (so their callers answer 503), as vLLM's output handler does when it sees the death
        first. Shutting the engine down cancels that handler, and a request it had not
        failed yet would otherwise wait forever."""
        from vllm.v1.engine.exceptions import EngineDeadError

        self._failed = True
        self._engine.output_processor.propagate_error(EngineDeadError())

    async def check_health(self) -> None:
        await self._engine.check_health()

    def num_unfinished(self) -> int:
        """Requests the engine still holds (running or waiting)."""
        return int(self._engine.get_num_unfinished_requests())

    def pids(self) -> list[int]:
        """The engine's core processes (each starts its workers as its children)."""
        manager = getattr(self._engine.engine_core.resources, "engine_manager", None)
        return [p.pid for p in getattr(manager, "processes", []) if p.pid is not None]

    def shutdown(self) -> None:
        self._engine.shutdown()

    def _raise(self, payload: dict[str, Any], exc: BaseException | None) -> NoReturn:
        """vLLM's error (an ErrorResponse, or its error chunk) as Iris's; 503 while the
        engine is dead."""
        if self.errored:
            raise EngineUnavailable.restarting()
        status = int(payload.get("error", {}).get("code") or 500)
        if status >= 500 and exc is not None:
            raise to_error(exc)
        raise error_from_openai_payload(status, payload)


class VllmChatEngine(InProcessEngine):
    """An in-process vLLM AsyncLLM plus vLLM's OpenAIServingChat."""

    def __init__(self, engine: Any, serving_chat: Any, cache_totals: Any = None) -> None:
        super().__init__(engine)
        self._chat = serving_chat
        self._totals = cache_totals

    @classmethod
    async def start(cls, cfg: IrisConfig) -> VllmChatEngine:
        from handlers.engine_stats import stat_loggers

        totals, loggers = stat_loggers(cfg.engine.metrics)
        engine, state = await start_async_llm(parse_engine_args(cfg), loggers)
        return cls(engine, state.openai_serving_chat, totals)

    def cache_stats(self) -> dict[str, int]:
        return self._totals.as_dict() if self._totals is not None else {}

    async def chat(
        self, body: dict[str, Any], images: Sequence[tuple[np.ndarray, str]]
    ) -> EventStream:
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
            raise InvalidRequest(msg, param=param) from None
        except Exception as exc:  # vLLM's validators raise its own errors (e.g. stream_options)
            self._raise(create_error_response(exc).model_dump(), exc)
        try:
            result = await self._chat.create_chat_completion(request, None)
        except Exception as exc:  # vLLM raises some client errors instead of returning
            self._raise(create_error_response(exc).model_dump(), exc)
        if isinstance(result, ChatCompletionResponse):
            yield JsonAnswer(result.model_dump(mode="json", exclude_none=True))
            return
        if not hasattr(result, "__aiter__"):  # ErrorResponse
            self._raise(result.model_dump(), None)
        async with aclosing(result) as chunks:  # closing it aborts the engine request
            async for chunk in chunks:
                if chunk.startswith(_ERROR_CHUNK):
                    self._raise(json.loads(chunk[len("data: "):].split("\n", 1)[0]), None)
                yield SseChunk(chunk)

