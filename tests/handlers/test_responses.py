"""The Responses API on the chat path: request translation (and what Iris refuses), chat answers
as Response objects, and chat streams as Responses event streams, read back through the openai
SDK's own client and stream accumulator."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, get_args

import httpx
import openai
import pydantic
import pytest
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from handlers.errors import InvalidRequest, RequestTimeout
from handlers.protocol import Detail, extract_images
from handlers.responses import (
    ResponsesRequest,
    chat_body,
    new_response_id,
    parse_request,
    response_from_chat,
    responses_param,
)
from handlers.responses_stream import ResponsesStream, sse_frames

MODEL = "demo-vlm"
PNG = "data:image/png;base64,iVBORw0KGgo="
WEATHER = {"type": "function", "name": "get_weather", "description": "Weather for a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                          "required": ["city"]}, "strict": True}
TIME = {"type": "function", "name": "get_time", "parameters": {"type": "object"}}
EVENTS: TypeAdapter[Any] = TypeAdapter(ResponseStreamEvent)


def translate(**body: Any) -> dict[str, Any]:
    return chat_body(parse_request({"model": MODEL, **body}))


def refused(**body: Any) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as info:
        translate(**body)
    assert info.value.status == 400
    return info.value


# --- requests -------------------------------------------------------------------------------


def test_string_input_instructions_and_sampling() -> None:
    body = translate(input="Describe the image.", instructions="Be brief.", max_output_tokens=64,
                     temperature=0.2, top_p=0.9, user="u-1", metadata={"k": "v"},
                     store=False, previous_response_id=None, include=["reasoning"],
                     some_future_key={"x": 1}, seed=7)
    assert body == {
        "model": MODEL,
        "messages": [{"role": "system", "content": "Be brief."},
                     {"role": "user", "content": "Describe the image."}],
        "max_completion_tokens": 64, "temperature": 0.2, "top_p": 0.9, "user": "u-1", "seed": 7,
    }


def test_streaming_asks_the_chat_path_for_usage() -> None:
    body = translate(input="hi", stream=True, stream_options={"include_obfuscation": False})
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}


def test_messages_with_images_reach_the_chat_parser_with_their_detail() -> None:
    body = translate(input=[
        {"role": "developer", "content": "Answer in French."},
        {"type": "message", "role": "user", "content": [
            {"type": "input_text", "text": "Compare"},
            {"type": "input_image", "image_url": "https://example.com/a.png", "detail": "original"},
            {"type": "input_image", "image_url": PNG, "detail": None},
            {"type": "input_image", "image_url": PNG, "detail": "low"},
        ]},
        {"type": "message", "role": "assistant", "status": "completed", "id": "msg_1",
         "content": [{"type": "output_text", "text": "Deux ", "annotations": []},
                     {"type": "output_text", "text": "chats.", "annotations": []}]},
        {"role": "user", "content": "Et maintenant ?"},
    ])
    msgs = body["messages"]
    assert msgs[0] == {"role": "system", "content": "Answer in French."}  # templates know no dev
    assert msgs[1]["content"][0] == {"type": "text", "text": "Compare"}
    assert msgs[1]["content"][2] == {"type": "image_url", "image_url": {"url": PNG}}
    assert msgs[2] == {"role": "assistant", "content": "Deux chats."}
    assert msgs[3] == {"role": "user", "content": "Et maintenant ?"}
    # The chat path's own parser accepts every image, with a detail it knows.
    _, refs = extract_images(msgs, max_images=8)
    original = "original" if "original" in get_args(Detail) else "high"
    assert [(r.param, r.url, r.detail) for r in refs] == [
        ("messages[1].content[1].image_url", "https://example.com/a.png", original),
        ("messages[1].content[2].image_url", PNG, "auto"),
        ("messages[1].content[3].image_url", PNG, "low")]


@pytest.mark.parametrize(("fmt", "expected"), [
    ({"type": "json_schema", "name": "cat", "strict": True, "description": "A cat",
      "schema": {"type": "object", "properties": {"name": {"type": "string"}}}},
     {"type": "json_schema", "json_schema": {
         "name": "cat", "strict": True, "description": "A cat",
         "schema": {"type": "object", "properties": {"name": {"type": "string"}}}}}),
    ({"type": "json_object"}, {"type": "json_object"}),
    ({"type": "text"}, None),
])
def test_text_format(fmt: dict[str, Any], expected: dict[str, Any] | None) -> None:
    body = translate(input="x", text={"format": fmt, "verbosity": "low"})
    assert body.get("response_format") == expected


@pytest.mark.parametrize(("choice", "expected"), [
    (None, None),
    ("auto", "auto"),
    ("none", "none"),
    ("required", "required"),
    ({"type": "function", "name": "get_time"}, {"type": "function",
                                                 "function": {"name": "get_time"}}),
])
def test_tools_are_nested_and_tool_choice_translated(choice: Any, expected: Any) -> None:
    extra = {} if choice is None else {"tool_choice": choice}
    body = translate(input="x", tools=[WEATHER, TIME], parallel_tool_calls=False, **extra)
    assert body["tools"] == [
        {"type": "function", "function": {
            "name": "get_weather", "description": "Weather for a city",
            "parameters": WEATHER["parameters"], "strict": True}},
        {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}},
    ]
    assert body.get("tool_choice") == expected
    assert body["parallel_tool_calls"] is False


def test_without_tools_the_chat_path_sees_no_tool_keys() -> None:
    # vLLM refuses tools: [] and a tool_choice without tools; "auto" then means nothing.
    body = translate(input="x", tools=[], tool_choice="auto", parallel_tool_calls=True)
    assert not {"tools", "tool_choice", "parallel_tool_calls"} & body.keys()


def test_function_call_history_becomes_assistant_tool_calls_and_tool_messages() -> None:
    body = translate(tools=[WEATHER], input=[
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"type": "reasoning", "id": "rs_1", "summary": []},
        {"type": "message", "role": "assistant", "content": [
            {"type": "output_text", "text": "Checking.", "annotations": []}]},
        {"type": "function_call", "call_id": "call_a", "name": "get_weather",
         "arguments": '{"city":"Paris"}', "id": "fc_1", "status": "completed"},
        {"type": "function_call", "call_id": "call_b", "name": "get_weather",
         "arguments": '{"city":"Rome"}'},
        {"type": "function_call_output", "call_id": "call_a", "output": "18C"},
        {"type": "function_call_output", "call_id": "call_b",
         "output": [{"type": "input_text", "text": "21"}, {"type": "input_text", "text": "C"}]},
        {"type": "function_call", "call_id": "call_c", "name": "get_weather",
         "arguments": '{"city":"Oslo"}'},
    ])
    call = lambda cid, city: {"id": cid, "type": "function", "function": {  # noqa: E731
        "name": "get_weather", "arguments": json.dumps({"city": city}, separators=(",", ":"))}}
    assert body["messages"] == [
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"role": "assistant", "content": "Checking.",
         "tool_calls": [call("call_a", "Paris"), call("call_b", "Rome")]},
        {"role": "tool", "tool_call_id": "call_a", "content": "18C"},
        {"role": "tool", "tool_call_id": "call_b", "content": "21C"},
        {"role": "assistant", "content": None, "tool_calls": [call("call_c", "Oslo")]},
    ]


def image_part(**part: Any) -> dict[str, Any]:
    return {"input": [{"role": "user", "content": [{"type": "input_text", "text": "see"},
                                                   {"type": "input_image", **part}]}]}


@pytest.mark.parametrize(("body", "param", "words"), [
    ({"input": "x", "previous_response_id": "resp_1"}, "previous_response_id", "no state"),
    ({"input": "x", "store": True}, "store", "no state"),
    ({"input": "x", "conversation": "conv_1"}, "conversation", "no state"),
    ({"input": "x", "background": True}, "background", "no state"),
    ({"input": "x", "prompt": {"id": "pmpt_1"}}, "prompt", "no state"),
    ({"input": "x", "tools": [WEATHER, {"type": "web_search"}]}, "tools[1].type", "web_search"),
    ({"input": "x", "tools": [{"type": "mcp", "server_label": "s"}]}, "tools[0].type", "built-in"),
    ({"input": "x", "tools": [{"type": "function"}]}, "tools[0].name", "string"),
    ({"input": "x", "tools": [TIME], "tool_choice": {"type": "function", "name": "nope"}},
     "tool_choice.name", "nope"),
    ({"input": "x", "tool_choice": "required"}, "tool_choice", "needs at least one"),
    ({"input": "x", "tools": [TIME], "tool_choice": {"type": "web_search_preview"}},
     "tool_choice", "tool_choice must be"),
    ({"input": "x", "tools": [TIME], "tool_choice": 5}, "tool_choice", "tool_choice must be"),
    (image_part(file_id="file-1", detail="auto"), "input[0].content[1].file_id", "image_url"),
    (image_part(detail="auto"), "input[0].content[1].image_url", "data: URI"),
    (image_part(image_url=PNG, detail="ultra"), "input[0].content[1].detail", "original"),
    ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]},
     "input[0].content[0].type", "file inputs"),
    ({"input": [{"role": "tool", "content": "x"}]}, "input[0].role", "must be one of"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0].type", "no state"),
    ({"input": [{"type": "web_search_call", "id": "ws"}]}, "input[0].type", "not supported"),
    ({"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]},
     "input[0].call_id", "string"),
    ({"input": "x", "text": {"format": {"type": "json_schema", "name": "n"}}},
     "text.format.schema", "JSON Schema"),
    ({"input": "x", "max_output_tokens": 0}, "max_output_tokens", "greater than or equal"),
    ({"input": []}, "input", "non-empty"),
    ({}, "input", "required"),
])
def test_refusals_name_the_field(body: dict[str, Any], param: str, words: str) -> None:
    err = refused(**body)
    assert err.param == param
    assert words in err.message


def test_chat_path_errors_name_the_responses_field() -> None:
    body = {"model": MODEL, "instructions": "Be brief.", "input": [
        {"role": "user", "content": "Weather?"},
        {"type": "message", "role": "assistant", "content": [
            {"type": "output_text", "text": "Checking.", "annotations": []}]},
        {"type": "function_call", "call_id": "c", "name": "get_weather", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c", "output": "18C"},
        {"type": "reasoning", "id": "rs", "summary": []},
        {"role": "user", "content": [{"type": "input_text", "text": "And this?"},
                                     {"type": "input_image", "image_url": "s3://b/k.png"}]},
    ]}
    req = parse_request(body)
    msgs = chat_body(req)["messages"]
    assert msgs[4]["content"][1]["image_url"]["url"] == "s3://b/k.png"
    assert responses_param(req, "messages[4].content[1].image_url") == (
        "input[5].content[1].image_url")
    assert responses_param(req, "messages[3].content") == "input[3].content"
    assert responses_param(req, "messages[2].tool_calls") == "input[1].tool_calls"
    assert responses_param(req, "messages[0].content") == "instructions"
    assert responses_param(req, "messages") == "input"
    assert responses_param(req, "temperature") == "temperature"
    assert responses_param(req, None) is None
    plain = parse_request({"model": MODEL, "input": "hi"})
    assert responses_param(plain, "messages[0].content") == "input"


def test_non_object_body_is_refused() -> None:
    with pytest.raises(InvalidRequest):
        parse_request(["not", "an", "object"])


# --- non-streamed answers -------------------------------------------------------------------


def chat_completion(content: str | None, *, tool_calls: list[dict[str, Any]] | None = None,
                    finish: str = "stop") -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": MODEL,
            "choices": [{"index": 0, "message": message, "finish_reason": finish}],
            "usage": {"prompt_tokens": 30, "completion_tokens": 5, "total_tokens": 35,
                      "prompt_tokens_details": {"cached_tokens": 16}}}


def tool_call(cid: str, name: str, args: str) -> dict[str, Any]:
    return {"id": cid, "type": "function", "function": {"name": name, "arguments": args}}


def test_a_chat_answer_is_a_valid_response_echoing_the_request() -> None:
    req = parse_request({"model": MODEL, "input": "hi", "instructions": "Be brief.",
                         "temperature": 0.5, "top_p": 0.8, "max_output_tokens": 50,
                         "tools": [WEATHER], "tool_choice": "auto", "user": "u",
                         "text": {"format": {"type": "json_schema", "name": "n",
                                             "schema": {"type": "object"}}}})
    out = response_from_chat(chat_completion("Two cats."), req, "resp_1", 1700000000)
    r = Response.model_validate(out)
    assert (r.id, r.object, r.status, r.model, r.created_at) == (
        "resp_1", "response", "completed", MODEL, 1700000000)
    assert r.output_text == "Two cats." and r.incomplete_details is None
    assert r.output[0].type == "message" and r.output[0].content[0].annotations == []
    assert r.usage is not None
    assert (r.usage.input_tokens, r.usage.output_tokens, r.usage.total_tokens) == (30, 5, 35)
    assert r.usage.input_tokens_details.cached_tokens == 16
    assert r.usage.output_tokens_details.reasoning_tokens == 0
    assert (r.instructions, r.temperature, r.top_p, r.max_output_tokens, r.user) == (
        "Be brief.", 0.5, 0.8, 50, "u")
    assert r.tool_choice == "auto" and r.parallel_tool_calls is True
    assert r.tools[0].type == "function" and r.tools[0].name == "get_weather"
    assert r.text is not None and r.text.format is not None
    assert r.text.format.type == "json_schema"


def test_chat_tool_calls_become_function_call_items() -> None:
    req = parse_request({"model": MODEL, "input": "x", "tools": [WEATHER, TIME],
                         "tool_choice": {"type": "function", "name": "get_weather"}})
    chat = chat_completion(None, finish="tool_calls", tool_calls=[
        tool_call("call_1", "get_weather", '{"city":"Paris"}'),
        tool_call("call_2", "get_time", "{}")])
    r = Response.model_validate(response_from_chat(chat, req, "resp_2", 1))
    assert r.status == "completed" and r.output_text == ""
    assert [(o.type, getattr(o, "call_id", None), getattr(o, "name", None),
             getattr(o, "arguments", None)) for o in r.output] == [
        ("function_call", "call_1", "get_weather", '{"city":"Paris"}'),
        ("function_call", "call_2", "get_time", "{}")]
    assert r.tool_choice.type == "function"


def test_a_truncated_answer_is_incomplete() -> None:
    req = parse_request({"model": MODEL, "input": "x", "max_output_tokens": 5})
    r = Response.model_validate(response_from_chat(chat_completion("Once upon a", finish="length"),
                                                   req, "resp_3", 1))
    assert r.status == "incomplete" and r.incomplete_details is not None
    assert r.incomplete_details.reason == "max_output_tokens"
    assert r.output[0].status == "incomplete"
    assert r.output_text == "Once upon a"


# --- through the openai SDK -----------------------------------------------------------------


def sdk_client(answer: Callable[[dict[str, Any]], httpx.Response],
               seen: list[dict[str, Any]]) -> openai.OpenAI:
    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v1/responses"
        body = json.loads(request.content)
        seen.append(chat_body(parse_request(body)))
        return answer(body)

    return openai.OpenAI(base_url="http://test/v1", api_key="x", max_retries=0,
                         http_client=httpx.Client(transport=httpx.MockTransport(handler)))


def sse_response(text: str) -> httpx.Response:
    return httpx.Response(200, headers={"content-type": "text/event-stream"},
                          content=text.encode())


def test_sdk_create_non_streamed() -> None:
    seen: list[dict[str, Any]] = []

    def answer(body: dict[str, Any]) -> httpx.Response:
        out = response_from_chat(chat_completion("A red square."), parse_request(body),
                                 new_response_id(), 1700000000)
        return httpx.Response(200, json=out)

    client = sdk_client(answer, seen)
    r = client.responses.create(model=MODEL, input=[{"role": "user", "content": [
        {"type": "input_text", "text": "What is it?"},
        {"type": "input_image", "image_url": PNG, "detail": "auto"}]}])
    assert r.output_text == "A red square." and r.id.startswith("resp_")
    assert r.usage is not None and r.usage.total_tokens == 35
    assert seen[0]["messages"][0]["content"][1] == {
        "type": "image_url", "image_url": {"url": PNG, "detail": "auto"}}


def test_sdk_parse_structured_output() -> None:
    class Cat(pydantic.BaseModel):
        name: str
        lives: int

    seen: list[dict[str, Any]] = []

    def answer(body: dict[str, Any]) -> httpx.Response:
        out = response_from_chat(chat_completion('{"name": "Tom", "lives": 9}'),
                                 parse_request(body), new_response_id(), 1)
        return httpx.Response(200, json=out)

    r = sdk_client(answer, seen).responses.parse(model=MODEL, input="A cat?", text_format=Cat)
    assert r.output_parsed == Cat(name="Tom", lives=9)
    fmt = seen[0]["response_format"]
    assert fmt["type"] == "json_schema" and fmt["json_schema"]["name"] == "Cat"
    assert fmt["json_schema"]["strict"] is True
    assert set(fmt["json_schema"]["schema"]["properties"]) == {"name", "lives"}


def chunk(delta: dict[str, Any] | None = None, finish: str | None = None,
          usage: dict[str, Any] | None = None) -> dict[str, Any]:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": MODEL,
            "choices": choices, "usage": usage}


USAGE = {"prompt_tokens": 12, "completion_tokens": 4, "total_tokens": 16}


def chat_sse(chunks: list[dict[str, Any]]) -> str:
    """A chat stream as the chat path sends it: data frames, then [DONE]."""
    return "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"


def translate_stream(req: ResponsesRequest, sse: str, pieces: int = 7) -> list[dict[str, Any]]:
    """Feed chat SSE text in ragged pieces (frames split anywhere), then finish."""
    stream = ResponsesStream(req, new_response_id(), 1700000000)
    events = stream.start()
    step = max(1, len(sse) // pieces)
    for i in range(0, len(sse), step):
        events += stream.feed_sse(sse[i:i + step])
    events += stream.finish()
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    for e in events:
        EVENTS.validate_python(e)  # each event is a valid Responses stream event
    return events


def stream_through_sdk(chunks: list[dict[str, Any]], **kwargs: Any) -> tuple[
        list[Any], openai.lib.streaming.responses.ResponseStream[Any]]:
    seen: list[dict[str, Any]] = []
    sent: list[str] = []

    def answer(body: dict[str, Any]) -> httpx.Response:
        assert body["stream"] is True
        text = sse_frames(translate_stream(parse_request(body), chat_sse(chunks)))
        sent.append(text)
        return sse_response(text)

    client = sdk_client(answer, seen)
    with client.responses.stream(model=MODEL, input="Describe it.", **kwargs) as s:
        events = list(s)
    assert seen[0]["stream_options"] == {"include_usage": True}
    assert "[DONE]" not in sent[0]
    return events, s


def test_sdk_stream_accumulates_text() -> None:
    events, s = stream_through_sdk([
        chunk({"role": "assistant", "content": ""}), chunk({"content": "Hello"}),
        chunk({"content": " world"}), chunk({}, finish="stop"), chunk(usage=USAGE)])
    final = s.get_final_response()
    assert final.status == "completed" and final.output_text == "Hello world"
    assert final.usage is not None and final.usage.input_tokens == 12
    assert final.usage.total_tokens == 16
    types = [e.type for e in events]
    assert types[:2] == ["response.created", "response.in_progress"]
    assert types[-4:] == ["response.output_text.done", "response.content_part.done",
                          "response.output_item.done", "response.completed"]
    assert [e.snapshot for e in events if e.type == "response.output_text.delta"] == [
        "Hello", "Hello world"]


def test_sdk_stream_accumulates_function_calls() -> None:
    events, s = stream_through_sdk([
        chunk({"role": "assistant", "content": "Let me check."}),
        chunk({"tool_calls": [{"index": 0, "id": "call_a", "type": "function",
                               "function": {"name": "get_weather", "arguments": ""}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city":'}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": ' "Paris"}'}}]}),
        chunk({"tool_calls": [{"index": 1, "id": "call_b", "type": "function",
                               "function": {"name": "get_time", "arguments": "{}"}}]}),
        chunk({}, finish="tool_calls"), chunk(usage=USAGE)], tools=[WEATHER, TIME])
    final = s.get_final_response()
    assert final.status == "completed" and final.output_text == "Let me check."
    calls = [(o.call_id, o.name, o.arguments) for o in final.output if o.type == "function_call"]
    assert calls == [("call_a", "get_weather", '{"city": "Paris"}'), ("call_b", "get_time", "{}")]
    parsed = [o.parsed_arguments for o in final.output if o.type == "function_call"]
    assert parsed[0] == {"city": "Paris"}  # strict tool: the SDK parsed the streamed arguments
    assert [e.snapshot for e in events if e.type == "response.function_call_arguments.delta"] == [
        '{"city":', '{"city": "Paris"}', "{}"]
    done = [e.item.type for e in events if e.type == "response.output_item.done"]
    assert done == ["message", "function_call", "function_call"]
    args_done = [e.arguments for e in events if e.type == "response.function_call_arguments.done"]
    assert args_done == ['{"city": "Paris"}', "{}"]


def test_sdk_stream_truncated_ends_incomplete() -> None:
    events, _ = stream_through_sdk([chunk({"content": "Once upon"}), chunk({}, finish="length"),
                                    chunk(usage=USAGE)], max_output_tokens=2)
    last = events[-1]
    assert last.type == "response.incomplete" and last.response.status == "incomplete"
    assert last.response.incomplete_details.reason == "max_output_tokens"
    assert last.response.output_text == "Once upon" and last.response.usage.output_tokens == 4
    assert last.response.output[0].status == "incomplete"


def test_sdk_stream_error_mid_stream_fails_the_response() -> None:
    err = RequestTimeout("The request took longer than the server allows.").envelope()
    sse = chat_sse([chunk({"content": "Partial"})]).replace(
        "data: [DONE]", f"data: {json.dumps(err)}\n\ndata: [DONE]")
    seen: list[dict[str, Any]] = []

    def answer(body: dict[str, Any]) -> httpx.Response:
        stream = ResponsesStream(parse_request(body), "resp_err", 1)
        events = stream.feed_sse(sse) + stream.finish()  # finish after failure adds nothing
        for e in events:
            EVENTS.validate_python(e)
        return sse_response(sse_frames(events))

    client = sdk_client(answer, seen)
    with client.responses.stream(model=MODEL, input="x") as s:
        events = list(s)
        with pytest.raises(RuntimeError, match=r"response\.completed"):
            s.get_final_response()
    assert [e.type for e in events][-2:] == ["error", "response.failed"]
    assert events[-2].message == "The request took longer than the server allows."
    assert events[-2].code == "request_timeout"
    failed = events[-1].response
    assert failed.status == "failed" and failed.error.code == "server_error"
    assert failed.output_text == "Partial" and failed.output[0].status == "incomplete"


def test_failure_codes_map_to_response_error_codes() -> None:
    req = parse_request({"model": MODEL, "input": "x"})
    image = ResponsesStream(req, "r", 1).fail(
        {"error": {"message": "too big", "type": "invalid_request_error", "param": None,
                   "code": "image_too_large"}})
    other = ResponsesStream(req, "r", 1).fail(InvalidRequest("bad", param="input"))
    assert image[-1]["response"]["error"]["code"] == "image_too_large"
    assert other[-1]["response"]["error"]["code"] == "invalid_prompt"
    assert other[-2]["param"] == "input"
    for e in image + other:
        EVENTS.validate_python(e)


def test_an_empty_chat_stream_still_answers_one_message() -> None:
    req = parse_request({"model": MODEL, "input": "x", "stream": True})
    events = translate_stream(req, chat_sse([chunk({}, finish="stop"), chunk(usage=USAGE)]))
    final = Response.model_validate(events[-1]["response"])
    assert events[-1]["type"] == "response.completed" and final.output_text == ""
    assert [o.type for o in final.output] == ["message"]
    assert "response.output_text.delta" not in [e["type"] for e in events]


def test_nothing_is_sent_after_the_stream_ends() -> None:
    stream = ResponsesStream(parse_request({"model": MODEL, "input": "x"}), "r", 1)
    assert stream.feed(chunk({"content": "a"}))  # starts the stream implicitly
    assert stream.finish()[-1]["type"] == "response.completed"
    assert stream.feed(chunk({"content": "b"})) == [] and stream.finish() == []
    assert stream.fail(InvalidRequest("late")) == []


async def test_async_sdk_stream() -> None:
    chunks = [chunk({"content": "Bonjour"}), chunk({}, finish="stop"), chunk(usage=USAGE)]

    def handler(request: httpx.Request) -> httpx.Response:
        req = parse_request(json.loads(request.content))
        return sse_response(sse_frames(translate_stream(req, chat_sse(chunks))))

    client = openai.AsyncOpenAI(base_url="http://test/v1", api_key="x", max_retries=0,
                                http_client=httpx.AsyncClient(
                                    transport=httpx.MockTransport(handler)))
    async with client.responses.stream(model=MODEL, input="Salut") as s:
        final = await s.get_final_response()
    assert final.output_text == "Bonjour" and final.status == "completed"
