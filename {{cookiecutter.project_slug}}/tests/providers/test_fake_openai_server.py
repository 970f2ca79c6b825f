"""The fake server speaks OpenAI's wire format: every body and event validates against the
`openai` package's own types, in the order OpenAI sends them."""

from __future__ import annotations

import json

import httpx2
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from tests.fakes.openai_server import Failure, Text, ToolCall

STREAM_EVENT = TypeAdapter(ResponseStreamEvent)


def post(fake, path: str, body: dict) -> httpx2.Response:
    return httpx2.post(f"{fake.url}{path}", json=body, timeout=10)


def events(response: httpx2.Response) -> list[tuple[str | None, str]]:
    """(event name, data) of each server-sent event."""
    found = []
    for block in response.text.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        if "data" in fields:
            found.append((fields.get("event"), fields["data"]))
    return found


def test_a_streamed_response_is_openais_event_sequence(fake_openai):
    fake_openai.reply(Text("Hello, world", deltas=3))

    response = post(fake_openai, "/responses", {"model": "m", "input": "hi", "stream": True})

    assert response.headers["content-type"].startswith("text/event-stream")
    parsed = [
        (name, STREAM_EVENT.validate_python(json.loads(data))) for name, data in events(response)
    ]
    assert all(name == event.type for name, event in parsed)
    assert [event.type for _, event in parsed] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * 3,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [event.sequence_number for _, event in parsed] == list(range(len(parsed)))
    deltas = [event.delta for _, event in parsed if event.type == "response.output_text.delta"]
    assert "".join(deltas) == "Hello, world"
    completed = parsed[-1][1].response
    assert completed.output_text == "Hello, world" and completed.usage.total_tokens > 0


def test_a_streamed_function_call(fake_openai):
    fake_openai.reply(ToolCall("calculate", {"expression": "1 + 1"}, call_id="call_1"))

    response = post(fake_openai, "/responses", {"model": "m", "input": "hi", "stream": True})

    parsed = [STREAM_EVENT.validate_python(json.loads(data)) for _, data in events(response)]
    assert [event.type for event in parsed][2:-1] == [
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
    ]
    [call] = parsed[-1].response.output
    assert (call.type, call.name, call.call_id) == ("function_call", "calculate", "call_1")
    assert json.loads(call.arguments) == {"expression": "1 + 1"}


def test_json_responses_and_completions(fake_openai):
    fake_openai.reply(Text("plain"), ToolCall("word_count", {"text": "a b"}))

    response = Response.model_validate(
        post(fake_openai, "/responses", {"model": "m", "input": "hi"}).json()
    )
    completion = ChatCompletion.model_validate(
        post(fake_openai, "/chat/completions", {"model": "m", "messages": []}).json()
    )

    assert response.output_text == "plain"
    [call] = completion.choices[0].message.tool_calls
    assert (call.function.name, completion.choices[0].finish_reason) == ("word_count", "tool_calls")


@pytest.mark.parametrize("reply", [Text("abcdef", deltas=3), ToolCall("calculate", {"x": 1})])
def test_streamed_chat_completion_chunks(fake_openai, reply):
    fake_openai.reply(reply)
    body = {"model": "m", "messages": [], "stream": True, "stream_options": {"include_usage": True}}

    response = post(fake_openai, "/chat/completions", body)

    *data, done = [data for _, data in events(response)]
    assert done == "[DONE]"
    chunks = [ChatCompletionChunk.model_validate(json.loads(item)) for item in data]
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens > 0
    finish = chunks[-2].choices[0].finish_reason
    if isinstance(reply, Text):
        text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks[:-1])
        assert (text, finish) == ("abcdef", "stop")
    else:
        arguments = "".join(
            call.function.arguments or ""
            for chunk in chunks[:-1]
            for call in chunk.choices[0].delta.tool_calls or []
        )
        assert (json.loads(arguments), finish) == ({"x": 1}, "tool_calls")


def test_a_failure_is_an_openai_error_body(fake_openai):
    fake_openai.reply(Failure(429, "slow down", "rate_limit_exceeded", "rate_limit_exceeded"))

    response = post(fake_openai, "/responses", {"model": "m", "input": "hi"})

    assert response.status_code == 429
    assert response.json()["error"] == {
        "message": "slow down",
        "type": "rate_limit_exceeded",
        "param": None,
        "code": "rate_limit_exceeded",
    }


def test_a_request_without_a_scripted_reply_is_reported(fake_openai):
    response = post(fake_openai, "/responses", {"model": "m", "input": "hi"})

    assert response.status_code == 500
    assert len(fake_openai.unexpected) == 1
    fake_openai.unexpected.clear()  # expected here; the fixture fails any other test on it
