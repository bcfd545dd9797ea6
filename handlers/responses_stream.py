"""Streaming for the Responses API: chat.completion.chunk payloads in, Responses events out.

Events go out as `event: <type>\\ndata: <json>\\n\\n` frames with no `data: [DONE]` (Responses
streams end with response.completed, response.incomplete or response.failed)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from handlers.errors import IrisError
from handlers.responses import (
    ResponsesRequest,
    build_response,
    function_call_item,
    incomplete_reason,
    message_item,
    new_item_id,
    usage_from_chat,
)

# Iris error codes as the codes a Response's `error` may carry; client faults otherwise map
# to invalid_prompt, everything else to server_error.
_FAILED_CODES = {
    "invalid_image": "invalid_image",
    "image_too_large": "image_too_large",
    "image_not_found": "image_file_not_found",
    "image_url_forbidden": "invalid_image_url",
    "image_fetch_timeout": "failed_to_download_image",
    "image_source_unavailable": "failed_to_download_image",
}


def sse_frame(event: Mapping[str, Any]) -> str:
    """One server-sent event, named after the Responses event type."""
    return f"event: {event['type']}\ndata: {json.dumps(event, separators=(',', ':'))}\n\n"


def sse_frames(events: Iterable[Mapping[str, Any]]) -> str:
    return "".join(sse_frame(e) for e in events)


@dataclass
class _Item:
    kind: str  # "message" | "function_call"
    index: int
    id: str
    text: str = ""  # the message text, or the call's arguments
    call_id: str = ""
    name: str = ""
    status: str = "completed"
    done: bool = False

    def as_output(self) -> dict[str, Any]:
        if self.kind == "message":
            return message_item(self.id, self.text, self.status)
        return function_call_item(self.id, self.call_id, self.name, self.text, self.status)


class ResponsesStream:
    """Turns one chat completion stream into Responses stream events.

    Call `start()` (or just `feed`), then `feed(chunk)` for each chat.completion.chunk dict
    (or `feed_sse(text)` with raw chat SSE text), then `finish()` when the chat stream ends.
    On an error, `fail(error)`. Each returns the event dicts to send, in order; after the
    stream is over (completed, incomplete or failed) every call returns []."""

    def __init__(self, request: ResponsesRequest, response_id: str, created_at: float) -> None:
        self.request = request
        self.response_id = response_id
        self.created_at = created_at
        self._seq = 0
        self._items: list[_Item] = []
        self._current: _Item | None = None
        self._calls: dict[int, _Item] = {}  # chat tool_calls[].index -> its item
        self._usage: dict[str, Any] | None = None
        self._finish_reason: str | None = None
        self._started = False
        self.closed = False
        self._buffer = ""

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = {"type": kind, "sequence_number": self._seq, **fields}
        self._seq += 1
        return event

    def _response(self, status: str, **kw: Any) -> dict[str, Any]:
        output = [item.as_output() for item in self._items]
        return build_response(self.request, self.response_id, self.created_at, status=status,
                              output=output, **kw)

    def start(self) -> list[dict[str, Any]]:
        if self._started:
            return []
        self._started = True
        snapshot = self._response("in_progress")
        return [self._event("response.created", response=snapshot),
                self._event("response.in_progress", response=snapshot)]

    def feed(self, chunk: Mapping[str, Any]) -> list[dict[str, Any]]:
        events = self.start()
        if self.closed:
            return events
        if chunk.get("error"):
            return events + self.fail(chunk)
        if chunk.get("usage"):
            self._usage = dict(chunk["usage"])
        for choice in (chunk.get("choices") or [])[:1]:
            delta = choice.get("delta") or {}
            if delta.get("content"):
                events += self._text(delta["content"])
            for call in delta.get("tool_calls") or []:
                events += self._call(call)
            if choice.get("finish_reason"):
                self._finish_reason = choice["finish_reason"]
        return events

    def feed_sse(self, text: str) -> list[dict[str, Any]]:
        """Feed raw chat SSE text (`data: {...}` frames, perhaps several or a partial one)."""
        self._buffer += text.replace("\r\n", "\n")
        *frames, self._buffer = self._buffer.split("\n\n")
        events: list[dict[str, Any]] = []
        for frame in frames:
            data = "\n".join(line[5:].lstrip() for line in frame.split("\n")
                             if line.startswith("data:"))
            if data and data != "[DONE]":
                events += self.feed(json.loads(data))
        return events

    def _open(self, item: _Item) -> list[dict[str, Any]]:
        events = self._close(self._current)
        self._items.append(item)
        self._current = item
        added = item.as_output()
        if item.kind == "message":
            added["content"] = []
        events.append(self._event("response.output_item.added", output_index=item.index,
                                  item={**added, "status": "in_progress"}))
        if item.kind == "message":
            events.append(self._event(
                "response.content_part.added", item_id=item.id, output_index=item.index,
                content_index=0, part={"type": "output_text", "text": "", "annotations": [],
                                       "logprobs": []}))
        return events

    def _text(self, delta: str) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        item = self._current
        if item is None or item.kind != "message":
            item = _Item("message", len(self._items), new_item_id("msg"))
            events = self._open(item)
        item.text += delta
        events.append(self._event("response.output_text.delta", item_id=item.id,
                                  output_index=item.index, content_index=0, delta=delta,
                                  logprobs=[]))
        return events

    def _call(self, call: Mapping[str, Any]) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        fn = call.get("function") or {}
        index = int(call.get("index") or 0)
        item = self._calls.get(index)
        if item is None:
            item = _Item("function_call", len(self._items), new_item_id("fc"),
                         call_id=call.get("id") or new_item_id("call"), name=fn.get("name") or "")
            self._calls[index] = item
            events = self._open(item)
        elif fn.get("name") and not item.name:
            item.name = fn["name"]
        if fn.get("arguments"):
            item.text += fn["arguments"]
            events.append(self._event("response.function_call_arguments.delta",
                                      item_id=item.id, output_index=item.index,
                                      delta=fn["arguments"]))
        return events

    def _close(self, item: _Item | None) -> list[dict[str, Any]]:
        if item is None or item.done:
            return []
        item.done = True
        where = {"item_id": item.id, "output_index": item.index}
        if item.kind == "message":
            part = item.as_output()["content"][0]
            events = [
                self._event("response.output_text.done", **where, content_index=0,
                            text=item.text, logprobs=[]),
                self._event("response.content_part.done", **where, content_index=0, part=part),
            ]
        else:
            events = [self._event("response.function_call_arguments.done", **where,
                                  arguments=item.text)]
        events.append(self._event("response.output_item.done", output_index=item.index,
                                  item=item.as_output()))
        return events

    def finish(self) -> list[dict[str, Any]]:
        """The chat stream ended: close the open item and send the final Response."""
        events = self.start()
        if self.closed:
            return events
        if not self._items:  # nothing generated: still answer with one (empty) message
            events += self._open(_Item("message", 0, new_item_id("msg")))
        reason = incomplete_reason(self._finish_reason)
        if reason and self._current is not None:
            self._current.status = "incomplete"
        events += self._close(self._current)
        self.closed = True
        status = "incomplete" if reason else "completed"
        final = self._response(status, usage=usage_from_chat(self._usage), reason=reason)
        events.append(self._event(f"response.{status}", response=final))
        return events

    def fail(self, error: IrisError | Mapping[str, Any]) -> list[dict[str, Any]]:
        """An error after the stream began: an `error` event, then response.failed."""
        events = self.start()
        if self.closed:
            return events
        self.closed = True
        env = error.envelope() if isinstance(error, IrisError) else error
        inner = env.get("error")
        err: Mapping[str, Any] = inner if isinstance(inner, Mapping) else env
        message = str(err.get("message") or "The request failed.")
        code = err.get("code") if isinstance(err.get("code"), str) else None
        kind = err.get("type")
        failed_code = _FAILED_CODES.get(code or "") or (
            "invalid_prompt" if kind == "invalid_request_error" else "server_error")
        for item in self._items:
            if not item.done:
                item.status = "incomplete"
        events.append(self._event("error", code=code or kind, message=message,
                                  param=err.get("param")))
        events.append(self._event("response.failed", response=self._response(
            "failed", error={"code": failed_code, "message": message})))
        return events
