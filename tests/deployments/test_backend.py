"""The chat backend's promises, in both layouts, without a cluster: events relayed as typed,
errors raised as Iris's, the engine request stopped when the stream is closed, (with the
engine in-process) admission that frees a slot as soon as an answer is done, and (with the
engine in LLMServer) a call whose replica died before answering sent again. The app-level
proof of the last is the chaos fault kill_llm_server."""

from __future__ import annotations

import asyncio

import pytest
from ray.exceptions import ActorDiedError, RayTaskError

from deployments.backend import InProcessBackend, ServeBackend
from deployments.contract import EngineRequest
from handlers.admission import Admission
from handlers.errors import EngineUnavailable, InvalidRequest, Overloaded
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
    stream = ServeBackend(handle, 60).chat(REQUEST)
    assert await anext(stream) == SseChunk("a")
    with pytest.raises(InvalidRequest) as info:
        await anext(stream)
    assert type(info.value) is InvalidRequest and info.value.param == "messages"
    assert handle.cancelled  # the remote stream is stopped


async def test_serve_layout_closing_early_cancels_the_remote_stream() -> None:
    handle = FakeStreamingHandle([SseChunk("a"), SseChunk("b")])
    stream = ServeBackend(handle, 60).chat(REQUEST)
    assert await anext(stream) == SseChunk("a")
    await stream.aclose()
    assert handle.cancelled and handle.calls == [REQUEST]


async def test_serve_layout_reading_to_the_end_does_not_cancel() -> None:
    handle = FakeStreamingHandle([JsonAnswer({})])
    events = [e async for e in ServeBackend(handle, 60).chat(REQUEST)]
    assert events == [JsonAnswer({})] and not handle.cancelled
    await asyncio.sleep(0)


async def test_serve_layout_closing_after_a_json_answer_does_not_cancel() -> None:
    """A JSON answer is the end of the call: the ingress closes the stream after reading it,
    and the finished call must not be cancelled (a cancel could race the replica's log)."""
    handle = FakeStreamingHandle([JsonAnswer({"n": 1})])
    stream = ServeBackend(handle, 60).chat(REQUEST)
    assert await anext(stream) == JsonAnswer({"n": 1})
    await stream.aclose()
    assert not handle.cancelled


async def test_serve_layout_sends_the_call_again_when_its_replica_died_before_answering() -> None:
    handle = FakeStreamingHandle([SseChunk("a"), SseChunk("b")], lost_calls=2,
                                 lost=ActorDiedError())
    events = [e async for e in ServeBackend(handle, 60).chat(REQUEST)]
    assert events == [SseChunk("a"), SseChunk("b")]
    assert handle.calls == [REQUEST] * 3  # two lost, the third answered


async def test_serve_layout_cuts_an_answer_whose_replica_died_mid_stream() -> None:
    """Events already went to the client: not sent again, engine_unavailable instead of a
    generic 500."""
    handle = FakeStreamingHandle([SseChunk("a")], fail=ActorDiedError())
    stream = ServeBackend(handle, 60).chat(REQUEST)
    assert await anext(stream) == SseChunk("a")
    with pytest.raises(EngineUnavailable) as info:
        await anext(stream)
    assert info.value.code == "engine_unavailable" and len(handle.calls) == 1


async def test_serve_layout_gives_up_on_a_lost_replica_at_its_deadline() -> None:
    handle = FakeStreamingHandle([SseChunk("a")], lost_calls=1, lost=ActorDiedError())
    with pytest.raises(EngineUnavailable) as info:
        await anext(ServeBackend(handle, 0).chat(REQUEST))
    assert info.value.status == 503 and info.value.headers["Retry-After"]
    assert len(handle.calls) == 1


async def test_serve_layout_does_not_repeat_a_call_its_replica_refused() -> None:
    refused = RayTaskError("LLMServer.chat", "Traceback ...",
                           InvalidRequest("bad", param="messages")).as_instanceof_cause()
    handle = FakeStreamingHandle([], fail=refused)
    with pytest.raises(InvalidRequest):
        await anext(ServeBackend(handle, 60).chat(REQUEST))
    assert len(handle.calls) == 1
