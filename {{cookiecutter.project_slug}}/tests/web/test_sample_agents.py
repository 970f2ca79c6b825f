"""The sample agents: deterministic tools and the offline demo model, through the real Runner."""

from __future__ import annotations

import asyncio
import re

import pytest
from agents import OpenAIResponsesModel, Runner, RunResultStreaming

from chat.demo_model import DemoModel, plan_tool_requests
from chat.providers import build_model
from chat.registry import get_agent_registry
from chat.tools import ToolInputError, calculate, convert_units, current_utc_time, word_count


@pytest.mark.parametrize(
    ("expression", "result"),
    [
        ("2 + 2", "4"),
        ("(12 + 7) * 3", "57"),
        ("2 ^ 10", "1024"),
        ("7 / 2", "3.5"),
        ("-3 ** 2", "-9"),
        ("10 // 4 + 10 % 4", "4"),
        ("0.1 + 0.2", "0.3"),
    ],
)
def test_calculate(expression, result):
    assert calculate(expression) == result


@pytest.mark.parametrize(
    "expression",
    ["__import__('os').system('id')", "x + 1", "2 ** 1000", "1 / 0", "", "(1", "[1] * 3"],
)
def test_calculate_refuses_anything_but_arithmetic(expression):
    with pytest.raises(ToolInputError):
        calculate(expression)


def test_convert_units():
    assert convert_units(10, "km", "miles") == "10 km = 6.21371 mi"
    assert convert_units(100, "celsius", "F") == "100 c = 212 f"
    assert convert_units(2, "lbs", "kg") == "2 lb = 0.907185 kg"
    with pytest.raises(ToolInputError, match="Cannot convert length to mass"):
        convert_units(1, "m", "kg")
    with pytest.raises(ToolInputError, match="Unknown unit"):
        convert_units(1, "parsec", "m")


def test_word_count_and_time():
    assert word_count("The quick brown fox. It jumps!") == "6 words, 30 characters, 2 sentences"
    assert re.fullmatch(r"\w+day \d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", current_utc_time())


def test_the_demo_model_plans_tool_calls_from_the_message():
    assert [r.name for r in plan_tool_requests("What is (12 + 7) * 3?")] == ["calculate"]
    assert plan_tool_requests("convert 3 ft to m")[0].arguments == {
        "value": 3.0,
        "from_unit": "ft",
        "to_unit": "m",
    }
    assert plan_tool_requests('count the words in "a b c"')[0].arguments == {"text": "a b c"}
    assert [r.name for r in plan_tool_requests("what time is it")] == ["current_utc_time"]
    assert plan_tool_requests("tell me a story") == []


def test_the_assistant_hands_off_to_the_toolsmith_which_calls_the_tool():
    result = Runner.run_sync(get_agent_registry()["assistant"](), "What is (12 + 7) * 3?")

    assert result.last_agent.name == "Toolsmith"
    calls = [item.raw_item.name for item in result.new_items if item.type == "tool_call_item"]
    assert calls == ["calculate"]
    assert "`(12 + 7) * 3` = **57**" in result.final_output


def test_the_toolsmith_answers_a_conversion_when_streamed():
    async def run_streamed() -> RunResultStreaming:
        result = Runner.run_streamed(get_agent_registry()["toolsmith"](), "Convert 10 km to miles")
        async for _event in result.stream_events():
            pass
        return result

    result = asyncio.run(run_streamed())
    assert "10 km = 6.21371 mi" in result.final_output


def test_small_talk_remembers_the_conversation():
    assistant = get_agent_registry()["assistant"]
    first = Runner.run_sync(assistant(), "hello")
    second = Runner.run_sync(
        assistant(), [*first.to_input_list(), {"role": "user", "content": "again"}]
    )

    assert first.final_output.startswith("Hello! You said:")
    assert "I remember 1 earlier message(s)" in second.final_output


def test_the_demo_model_is_used_without_an_api_key(settings):
    settings.OPENAI_API_KEY = ""
    assert isinstance(build_model(), DemoModel)


def test_the_openai_model_is_used_with_an_api_key(settings):
    settings.OPENAI_API_KEY = "sk-test"
    settings.OPENAI_MODEL = "gpt-test-mini"
    model = build_model()

    assert isinstance(model, OpenAIResponsesModel)
    assert model.model == "gpt-test-mini"


def test_slow_messages_think_once_then_answer_the_rest(monkeypatch):
    slept: list[float] = []
    real_sleep = asyncio.sleep

    async def record(seconds: float) -> None:
        slept.append(seconds)
        await real_sleep(0)

    monkeypatch.setattr("chat.demo_model.asyncio.sleep", record)
    result = Runner.run_sync(get_agent_registry()["assistant"](), "/slow 7 What is 6 * 7?")

    assert [s for s in slept if s] == [7.0]  # the first call of the turn only
    assert "`6 * 7` = **42**" in result.final_output
