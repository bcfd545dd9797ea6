"""The chat backend's promises, in both layouts, without a cluster: events relayed as typed,
errors raised as Iris's, the engine request stopped when the stream is closed, and (with the
engine in-process) admission that frees a slot as soon as an answer is done."""

from __future__ import annotations

import asyncio

import pytest
from ray.exceptions import RayTaskError

from deployments.backend import InProcessBackend, ServeBackend
from deployments.contract import EngineRequest
from handlers.admission import Admission
from handlers.errors import InvalidRequest, Overloaded
from handlers.events import JsonAnswer, SseChunk
from tests.fakes import FakeEngineHost, FakeStreamingHandle

REQUEST = EngineRequest({"messages": []})


async def test_in_process_events_are_relayed_and_closing_stops_the_engine() -> None:
    host = FakeEngineHost([[SseChunk("a"), SseChunk("b")]], hang=True)
    backend = InProcessBackend(host, Admission(4, 4))
    stream = backend.chat(REQUEST)
    assert [await anext(stream), await anext(stream)] == [SseChunk("a"), SseChunk("b")]
    await stream.aclose()
    assert host.closed == 1


async def test_a_finished_json_answer_frees_its_admission_slot_at_once() -> None:
    host = FakeEngineHost([[JsonAnswer({"n": 1})], [JsonAnswer({"n": 2})]], hang=True)
    backend = InProcessBackend(host, Admission(1, 0))
    first = backend.chat(REQUEST)
    assert await anext(first) == JsonAnswer({"n": 1})
    await first.aclose()  # what the ingress does after a JSON answer
    second = backend.chat(REQUEST)
    assert await anext(second) == JsonAnswer({"n": 2})  # admitted: the slot came back
    await second.aclose()


async def test_in_process_overload_is_refused_with_retry_after() -> None:
    host = FakeEngineHost([[SseChunk("a")], [SseChunk("b")]], hang=True)
    backend = InProcessBackend(host, Admission(1, 0))
    busy = backend.chat(REQUEST)
    await anext(busy)
    with pytest.raises(Overloaded) as info:
        await anext(backend.chat(REQUEST))
    assert info.value.headers["Retry-After"] == "1"
    await busy.aclose()


async def test_serve_layout_raises_the_replicas_error_as_iris_error() -> None:
    remote = RayTaskError("LLMServer.chat", "Traceback ...",
                          InvalidRequest("bad", param="messages")).as_instanceof_cause()
    handle = FakeStreamingHandle([SseChunk("a")], fail=remote)
    stream = ServeBackend(handle).chat(REQUEST)
    assert await anext(stream) == SseChunk("a")
    with pytest.raises(InvalidRequest) as info:
        await anext(stream)
    assert type(info.value) is InvalidRequest and info.value.param == "messages"
    assert handle.cancelled  # the remote stream is stopped


async def test_serve_layout_closing_early_cancels_the_remote_stream() -> None:
    handle = FakeStreamingHandle([SseChunk("a"), SseChunk("b")])
    stream = ServeBackend(handle).chat(REQUEST)
    assert await anext(stream) == SseChunk("a")
    await stream.aclose()
    assert handle.cancelled and handle.calls == [REQUEST]


async def test_serve_layout_reading_to_the_end_does_not_cancel() -> None:
    handle = FakeStreamingHandle([JsonAnswer({})])
    events = [e async for e in ServeBackend(handle).chat(REQUEST)]
    assert events == [JsonAnswer({})] and not handle.cancelled
    await asyncio.sleep(0)


async def test_serve_layout_closing_after_a_json_answer_does_not_cancel() -> None:
    """A JSON answer is the end of the call: the ingress closes the stream after reading it,
    and the finished call must not be cancelled (a cancel could race the replica's log)."""
    handle = FakeStreamingHandle([JsonAnswer({"n": 1})])
    stream = ServeBackend(handle).chat(REQUEST)
    assert await anext(stream) == JsonAnswer({"n": 1})
    await stream.aclose()
    assert not handle.cancelled
