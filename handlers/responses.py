"""OpenAI's Responses API (POST /v1/responses), stateless, run on the chat completions path.

`parse_request` checks a Responses body, `chat_body` turns it into a chat completions body,
`response_from_chat` turns a chat.completion back into a Response object. Streaming is in
`handlers.responses_stream`. Iris keeps nothing between requests: stored responses,
conversations, background runs, prompt templates and built-in tools are refused up front."""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Mapping
from typing import Any, get_args

from pydantic import BaseModel, ConfigDict, Field

from handlers.errors import InvalidRequest
from handlers.protocol import Detail, validated

STATELESS = "Iris keeps no state between requests"
# What the chat path accepts; "original" (full resolution) is closest to Iris's "high".
_CHAT_DETAILS = set(get_args(Detail))
_DETAILS = {"auto", "low", "high", "original"}
_ROLES = {"user", "system", "developer", "assistant"}
# vLLM sampling extras clients send in extra_body; they mean the same on the chat path.
_PASSTHROUGH = ("seed", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                "frequency_penalty", "stop")


class ResponsesRequest(BaseModel):
    """The Responses fields Iris reads; other keys are accepted and ignored."""

    model_config = ConfigDict(extra="allow")
    model: str
    input: Any = None
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = None
    top_p: float | None = None
    user: str | None = None
    metadata: dict[str, str] | None = None
    parallel_tool_calls: bool | None = None
    text: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    stream: bool | None = False
    stream_options: dict[str, Any] | None = None
    store: bool | None = None
    previous_response_id: str | None = None
    background: bool | None = None
    conversation: Any = None
    prompt: Any = None


def new_response_id() -> str:
    return f"resp_{uuid.uuid4().hex}"


def new_item_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def parse_request(body: Any) -> ResponsesRequest:
    """Validate a Responses body, refusing what needs server-side state. Raises InvalidRequest."""
    req = validated(ResponsesRequest, body)
    if req.previous_response_id is not None:
        raise InvalidRequest(f"previous_response_id is not supported: {STATELESS}; send the "
                             "whole conversation in input.", param="previous_response_id")
    if req.store:
        raise InvalidRequest(f"store: true is not supported: {STATELESS}; omit store or send "
                             "store: false.", param="store")
    if req.conversation is not None:
        raise InvalidRequest(f"conversation is not supported: {STATELESS}; send the whole "
                             "conversation in input.", param="conversation")
    if req.background:
        raise InvalidRequest(f"background: true is not supported: {STATELESS}; send the "
                             "request without background.", param="background")
    if req.prompt is not None:
        raise InvalidRequest(f"prompt templates are not supported: {STATELESS}; send the text "
                             "in instructions and input.", param="prompt")
    if req.input is None:
        raise InvalidRequest("input is required.", param="input")
    return req


def chat_body(req: ResponsesRequest) -> dict[str, Any]:
    """The chat completions body for a Responses request. Raises InvalidRequest, naming the
    Responses field. A streamed request asks for usage in the last chunk."""
    messages, _ = _messages(req.input)
    if req.instructions:
        messages.insert(0, {"role": "system", "content": req.instructions})
    body: dict[str, Any] = {"model": req.model, "messages": messages}
    tools = chat_tools(req.tools)
    if tools:
        body["tools"] = tools
        if req.parallel_tool_calls is not None:
            body["parallel_tool_calls"] = req.parallel_tool_calls
    choice = _tool_choice(req.tool_choice, {t["function"]["name"] for t in tools})
    if choice is not None:
        body["tool_choice"] = choice
    fmt = _response_format(req.text)
    if fmt is not None:
        body["response_format"] = fmt
    if req.max_output_tokens is not None:
        body["max_completion_tokens"] = req.max_output_tokens
    for key in ("temperature", "top_p", "user"):
        if getattr(req, key) is not None:
            body[key] = getattr(req, key)
    extra = req.model_extra or {}
    body.update({k: extra[k] for k in _PASSTHROUGH if extra.get(k) is not None})
    if req.stream:
        with_stream_usage(body)
    return body


def with_stream_usage(body: dict[str, Any]) -> dict[str, Any]:
    """Make a chat body stream, with usage in its last chunk (response.completed needs it)."""
    body["stream"] = True
    body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
    return body


def responses_param(req: ResponsesRequest, param: str | None) -> str | None:
    """The Responses field behind a chat-path error's param: `messages[2].content[1].image_url`
    becomes `input[1].content[1].image_url` (content parts keep their index)."""
    found = re.fullmatch(r"messages(?:\[(\d+)\](.*))?", param or "", re.DOTALL)
    if found is None:
        return param
    if found[1] is None:
        return "input"
    i, rest = int(found[1]), found[2]
    if req.instructions:
        if i == 0:
            return "instructions"
        i -= 1
    if isinstance(req.input, str):
        return "input"
    _, origin = _messages(req.input)
    return f"input[{origin[i]}]{rest}" if i < len(origin) else "input"


def _messages(items: Any) -> tuple[list[dict[str, Any]], list[int]]:
    """Chat messages for `input`, and the input index each one came from."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}], [0]
    if not isinstance(items, list) or not items:
        raise InvalidRequest("input must be a string or a non-empty list of items.",
                             param="input")
    out: list[dict[str, Any]] = []
    origin: list[int] = []
    for i, item in enumerate(items):
        before = len(out)
        at = f"input[{i}]"
        if not isinstance(item, dict):
            raise InvalidRequest(f"{at} must be an object.", param=at)
        kind = item.get("type", "message" if "role" in item else None)
        if kind == "message":
            out.append(_message(item, at))
        elif kind == "function_call":
            call = {"id": _str(item, "call_id", at), "type": "function", "function": {
                "name": _str(item, "name", at), "arguments": _str(item, "arguments", at)}}
            last = out[-1] if out else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            out.append({"role": "tool", "tool_call_id": _str(item, "call_id", at),
                        "content": _tool_output(item.get("output"), f"{at}.output")})
        elif kind == "reasoning":
            continue  # the model's own earlier reasoning: chat templates drop it anyway
        elif kind == "item_reference":
            raise InvalidRequest(f"{at}: item references are not supported: {STATELESS}; send "
                                 "the item itself.", param=f"{at}.type")
        else:
            raise InvalidRequest(f"{at}.type {kind!r} is not supported; use message, "
                                 "function_call or function_call_output.", param=f"{at}.type")
        origin += [i] * (len(out) - before)
    return out, origin


def _str(item: Mapping[str, Any], key: str, at: str) -> str:
    value = item.get(key)
    if not isinstance(value, str):
        raise InvalidRequest(f"{at}.{key} must be a string.", param=f"{at}.{key}")
    return value


def _message(item: Mapping[str, Any], at: str) -> dict[str, Any]:
    role = item.get("role")
    if role not in _ROLES:
        raise InvalidRequest(f"{at}.role must be one of {sorted(_ROLES)}.", param=f"{at}.role")
    content = item.get("content")
    if isinstance(content, str):
        return {"role": "system" if role == "developer" else role, "content": content}
    if not isinstance(content, list):
        raise InvalidRequest(f"{at}.content must be a string or a list of content parts.",
                             param=f"{at}.content")
    parts = [_part(part, f"{at}.content[{j}]") for j, part in enumerate(content)]
    if role == "assistant":  # chat templates want an assistant turn as one string
        for j, part in enumerate(parts):
            if part["type"] != "text":
                raise InvalidRequest(f"{at}.content[{j}]: assistant messages carry text only.",
                                     param=f"{at}.content[{j}].type")
        return {"role": "assistant", "content": "".join(p["text"] for p in parts)}
    # Chat templates know no "developer" role; it means system instructions.
    return {"role": "system" if role == "developer" else role, "content": parts}


def _part(part: Any, at: str) -> dict[str, Any]:
    if not isinstance(part, dict):
        raise InvalidRequest(f"{at} must be an object with a type.", param=at)
    kind = part.get("type")
    if kind in ("input_text", "output_text"):
        return {"type": "text", "text": _str(part, "text", at)}
    if kind == "refusal":
        return {"type": "text", "text": _str(part, "refusal", at)}
    if kind == "input_image":
        return _image(part, at)
    if kind == "input_file":
        raise InvalidRequest(f"{at}: file inputs are not supported; send images as input_image.",
                             param=f"{at}.type")
    raise InvalidRequest(f"{at}.type {kind!r} is not supported; use input_text or input_image.",
                         param=f"{at}.type")


def _image(part: Mapping[str, Any], at: str) -> dict[str, Any]:
    if part.get("file_id") is not None:
        raise InvalidRequest(f"{at}.file_id is not supported: Iris has no file storage; send the "
                             "image as image_url (an http(s) URL or a data: URI).",
                             param=f"{at}.file_id")
    url = part.get("image_url")
    if not isinstance(url, str) or not url:
        raise InvalidRequest(f"{at}.image_url must be an http(s) URL or a data: URI.",
                             param=f"{at}.image_url")
    image: dict[str, Any] = {"url": url}
    detail = part.get("detail")
    if detail is not None:
        if detail not in _DETAILS:
            raise InvalidRequest(f"{at}.detail must be one of {sorted(_DETAILS)}.",
                                 param=f"{at}.detail")
        image["detail"] = detail if detail in _CHAT_DETAILS else "high"
    return {"type": "image_url", "image_url": image}


def _tool_output(output: Any, at: str) -> str:
    if isinstance(output, str):
        return output
    if not isinstance(output, list):
        raise InvalidRequest(f"{at} must be a string or a list of input_text parts.", param=at)
    texts = []
    for j, part in enumerate(output):
        if not isinstance(part, dict) or part.get("type") != "input_text":
            raise InvalidRequest(f"{at}[{j}]: function outputs may carry text only.",
                                 param=f"{at}[{j}]")
        texts.append(_str(part, "text", f"{at}[{j}]"))
    return "".join(texts)


def chat_tools(tools: list[Any] | None) -> list[dict[str, Any]]:
    """Responses function tools (flat) as chat tools (nested under "function")."""
    out: list[dict[str, Any]] = []
    for i, tool in enumerate(tools or []):
        at = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise InvalidRequest(f"{at} must be an object.", param=at)
        if tool.get("type") != "function":
            raise InvalidRequest(
                f"{at}.type {tool.get('type')!r} is not supported: Iris runs only function "
                "tools; built-in tools (web_search, file_search, computer, code_interpreter, "
                "mcp, ...) are not available.", param=f"{at}.type")
        nested = tool.get("function")  # tolerate the chat shape sent to /responses
        src = nested if isinstance(nested, dict) and "name" not in tool else tool
        fn = {"name": _str(src, "name", at)}
        fn.update({k: src[k] for k in ("description", "parameters", "strict")
                   if src.get(k) is not None})
        out.append({"type": "function", "function": fn})
    return out


def _tool_choice(choice: Any, names: set[str]) -> Any:
    if choice is None:
        return None
    if choice in ("auto", "none", "required"):
        if choice == "required" and not names:
            raise InvalidRequest("tool_choice 'required' needs at least one function in tools.",
                                 param="tool_choice")
        return choice if names else None  # the chat path refuses tool_choice without tools
    if isinstance(choice, dict) and choice.get("type") == "function":
        name = choice.get("name")
        if name not in names:
            raise InvalidRequest(f"tool_choice names {name!r}, which is not a function in tools.",
                                 param="tool_choice.name")
        return {"type": "function", "function": {"name": name}}
    raise InvalidRequest("tool_choice must be 'auto', 'none', 'required' or "
                         "{'type': 'function', 'name': ...}.", param="tool_choice")


def _response_format(text: dict[str, Any] | None) -> dict[str, Any] | None:
    fmt = (text or {}).get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict):
        raise InvalidRequest("text.format must be an object.", param="text.format")
    kind = fmt.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind != "json_schema":
        raise InvalidRequest("text.format.type must be text, json_object or json_schema.",
                             param="text.format.type")
    schema = fmt.get("schema")
    if not isinstance(schema, dict):
        raise InvalidRequest("text.format.schema must be a JSON Schema object.",
                             param="text.format.schema")
    spec: dict[str, Any] = {"name": _str(fmt, "name", "text.format"), "schema": schema}
    spec.update({k: fmt[k] for k in ("description", "strict") if fmt.get(k) is not None})
    return {"type": "json_schema", "json_schema": spec}


# --- chat.completion -> Response -------------------------------------------------------------


def message_item(item_id: str, text: str, status: str = "completed") -> dict[str, Any]:
    part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
    return {"type": "message", "id": item_id, "role": "assistant", "status": status,
            "content": [part]}


def function_call_item(item_id: str, call_id: str, name: str, arguments: str,
                       status: str = "completed") -> dict[str, Any]:
    return {"type": "function_call", "id": item_id, "call_id": call_id, "name": name,
            "arguments": arguments, "status": status}


def usage_from_chat(usage: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if not usage:
        return None
    inp, out = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    reasoning = (usage.get("completion_tokens_details") or {}).get("reasoning_tokens") or 0
    return {
        "input_tokens": inp,
        "input_tokens_details": {"cached_tokens": int(cached), "cache_write_tokens": 0},
        "output_tokens": out,
        "output_tokens_details": {"reasoning_tokens": int(reasoning)},
        "total_tokens": int(usage.get("total_tokens") or inp + out),
    }


def incomplete_reason(finish_reason: str | None) -> str | None:
    """The Responses incomplete_details.reason for a chat finish_reason, or None if complete."""
    return {"length": "max_output_tokens", "content_filter": "content_filter"}.get(
        finish_reason or "")


def build_response(req: ResponsesRequest, response_id: str, created_at: float, *,
                   status: str, output: list[dict[str, Any]],
                   usage: dict[str, Any] | None = None, reason: str | None = None,
                   error: dict[str, Any] | None = None) -> dict[str, Any]:
    """A Response object echoing the request's settings."""
    fmt = (req.text or {}).get("format") or {"type": "text"}
    return {
        "id": response_id,
        "object": "response",
        "created_at": created_at,
        "completed_at": int(time.time()) if status == "completed" else None,
        "status": status,
        "error": error,
        "incomplete_details": {"reason": reason} if reason else None,
        "model": req.model,
        "instructions": req.instructions,
        "output": output,
        "usage": usage,
        "max_output_tokens": req.max_output_tokens,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "tools": [{"type": "function", **t["function"]} for t in chat_tools(req.tools)],
        "tool_choice": req.tool_choice if req.tool_choice is not None else "auto",
        "parallel_tool_calls": req.parallel_tool_calls is not False,
        "text": {"format": fmt},
        "user": req.user,
        "metadata": req.metadata or {},
        "store": False,
        "background": False,
        "previous_response_id": None,
        "truncation": "disabled",
    }


def response_from_chat(chat_json: Mapping[str, Any], request: ResponsesRequest,
                       response_id: str, created_at: float) -> dict[str, Any]:
    """A Response object for a non-streamed chat.completion answer."""
    choices = chat_json.get("choices") or [{}]
    choice = choices[0]
    message = choice.get("message") or {}
    text = message.get("content") or ""
    calls = message.get("tool_calls") or []
    output: list[dict[str, Any]] = []
    if text or not calls:
        output.append(message_item(new_item_id("msg"), text))
    for call in calls:
        fn = call.get("function") or {}
        output.append(function_call_item(
            new_item_id("fc"), call.get("id") or new_item_id("call"), fn.get("name") or "",
            fn.get("arguments") or ""))
    reason = incomplete_reason(choice.get("finish_reason"))
    if reason:
        output[-1]["status"] = "incomplete"
    return build_response(request, response_id, created_at,
                          status="incomplete" if reason else "completed", output=output,
                          usage=usage_from_chat(chat_json.get("usage")), reason=reason)
