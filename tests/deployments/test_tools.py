"""Tool calling works out of the box: the demo model's template has Qwen2.5's tool format and
the engine starts with the hermes parser. A random model rarely calls a tool by itself, so
these force the call (a named tool_choice, or "required", with strict arguments) and check
the parsing path: tool_calls in both forms, and through the Responses API."""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest

from tests.support import MODEL, client

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.", "strict": True,
    # An enum: with a free string the random model never closes the quote (constrained
    # decoding only bounds the shape), so the call would never end.
    "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Lyon"]}},
                   "required": ["city"], "additionalProperties": False}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
# The random model pads JSON with whitespace: room for the whole call.
ROOM = 1500


def assert_weather_call(name: str, arguments: str) -> None:
    assert name == "get_weather"
    assert json.loads(arguments) in ({"city": "Paris"}, {"city": "Lyon"})


@pytest.mark.parametrize("choice", [
    {"type": "function", "function": {"name": "get_weather"}}, "required"])
def test_forced_tool_calls_come_back_parsed(iris: str, choice: Any) -> None:
    resp = client(iris).chat.completions.create(
        model=MODEL, messages=ASK, tools=[WEATHER], tool_choice=choice, max_tokens=ROOM,
        temperature=0)
    calls = resp.choices[0].message.tool_calls or []
    # A named choice makes exactly one call; "required" at least one (the model may make more).
    assert len(calls) == 1 if isinstance(choice, dict) else len(calls) >= 1
    for call in calls:
        assert call.type == "function" and call.id
        assert_weather_call(call.function.name, call.function.arguments)


def test_forced_tool_calls_stream_as_deltas(iris: str) -> None:
    stream = client(iris).chat.completions.create(
        model=MODEL, messages=ASK, tools=[WEATHER], max_tokens=ROOM, temperature=0,
        tool_choice={"type": "function", "function": {"name": "get_weather"}}, stream=True)
    name, arguments = "", ""
    for chunk in stream:
        for delta in chunk.choices:
            for call in delta.delta.tool_calls or []:
                name += (call.function and call.function.name) or ""
                arguments += (call.function and call.function.arguments) or ""
    assert_weather_call(name, arguments)


def test_auto_tool_choice_is_accepted(iris: str) -> None:
    """What Open WebUI, LibreChat, Pydantic AI and Haystack send: tools with "auto"."""
    resp = client(iris).chat.completions.create(
        model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="auto", max_tokens=8)
    assert resp.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_tool_results_go_back_to_the_model(iris: str) -> None:
    history = [*ASK, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 21 C"}]
    resp = client(iris).chat.completions.create(model=MODEL, messages=history,
                                                tools=[WEATHER], max_tokens=4)
    assert resp.usage and resp.usage.prompt_tokens > 60


def test_a_forced_call_through_the_responses_api(iris: str) -> None:
    c: openai.OpenAI = client(iris)
    tool = {"type": "function", **WEATHER["function"]}
    resp = c.responses.create(model=MODEL, input="What is the weather in Paris?",
                              tools=[tool], tool_choice={"type": "function",
                                                         "name": "get_weather"},
                              max_output_tokens=ROOM, temperature=0)
    calls = [item for item in resp.output if item.type == "function_call"]
    assert len(calls) == 1
    assert_weather_call(calls[0].name, calls[0].arguments)
