"""An offline, deterministic stand-in for an LLM, used when no OPENAI_API_KEY is set.

It reads the latest user message and, when the message asks for something a sample tool does
(the time, arithmetic, unit conversion, word counts), calls that tool -- or hands off to an agent
that has it -- then answers from the tool output. Anything else gets a friendly canned reply.
It needs no network, so a freshly generated project chats out of the box and tests run offline.
A message starting with ``/slow N`` makes it think for N seconds first, to watch a long run.
"""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from agents import Handoff, Model, ModelResponse, ModelSettings, ModelTracing, Tool, Usage
from agents.agent_output import AgentOutputSchemaBase
from agents.items import TResponseInputItem, TResponseOutputItem, TResponseStreamEvent
from agents.testing import ModelStep, ScriptedModel, assistant_message, function_call
from openai.types.responses.response_prompt_param import ResponsePromptParam

from chat.tools import ToolInputError, normalize_unit

_TIME = re.compile(r"\b(time|date|today|clock|utc|what day)\b", re.IGNORECASE)
_CONVERSION = re.compile(
    r"(-?\d+(?:\.\d+)?)\s*(°?[a-z]+)\s+(?:to|in|into|as)\s+(°?[a-z]+)", re.IGNORECASE
)
_WORD_COUNT = re.compile(r"\b(count|how many)\b.*\bwords?\b", re.IGNORECASE | re.DOTALL)
_ARITHMETIC = re.compile(r"[-+*/^%\u00d7\u00f7().\d\s]*\d[-+*/^%\u00d7\u00f7().\d\s]*")
_OPERATOR_BETWEEN_NUMBERS = re.compile(r"[\d)]\s*(?:\*\*|//|[-+*/^%\u00d7\u00f7])\s*[-+(]*\s*[\d(]")
_SLOW = re.compile(r"^\s*/slow\s+(\d+(?:\.\d+)?)\s*", re.IGNORECASE)
MAX_DELAY_SECONDS = 300.0
_NOTE = re.compile(
    r"\b(?:send|post|leave|write)\b.*?\bnote\b(?:\s+to\s+the\s+team)?\s*[:,-]?\s*(.*)$|"
    r"\btell\s+the\s+team\b\s*(?:that\s*)?[:,-]?\s*(.*)$",
    re.IGNORECASE | re.DOTALL,
)
_GREETING = re.compile(r"^\s*(hi|hello|hey|good (morning|afternoon|evening))\b", re.IGNORECASE)


@dataclass(frozen=True)
class ToolRequest:
    """A tool call the demo model wants to make."""

    name: str
    arguments: dict[str, Any]


def _text_after_colon_or_quotes(message: str) -> str:
    quoted = re.search(r"[\"“](.+?)[\"”]", message, re.DOTALL)
    if quoted:
        return quoted.group(1)
    if ":" in message:
        return message.split(":", 1)[1].strip()
    return message


def plan_tool_requests(message: str) -> list[ToolRequest]:
    """Return the sample tool calls a user message asks for (possibly none)."""
    requests: list[ToolRequest] = []
    note = _NOTE.search(message)
    if note:
        text = _text_after_colon_or_quotes(message) if ":" in message or '"' in message else ""
        text = text or (note.group(1) or note.group(2) or "").strip() or message.strip()
        return [ToolRequest("send_team_note", {"text": text})]
    if _WORD_COUNT.search(message):
        return [ToolRequest("word_count", {"text": _text_after_colon_or_quotes(message)})]
    conversion = _CONVERSION.search(message)
    if conversion:
        value, source, target = conversion.groups()
        try:
            normalize_unit(source), normalize_unit(target)
        except ToolInputError:
            pass
        else:
            requests.append(
                ToolRequest(
                    "convert_units",
                    {"value": float(value), "from_unit": source, "to_unit": target},
                )
            )
    for candidate in _ARITHMETIC.findall(message):
        expression = candidate.strip()
        if _OPERATOR_BETWEEN_NUMBERS.search(expression):
            requests.append(ToolRequest("calculate", {"expression": expression}))
            break
    if _TIME.search(message):
        requests.append(ToolRequest("current_utc_time", {}))
    return requests


def _as_dict(item: Any) -> dict[str, Any]:
    if isinstance(item, dict):
        return item
    if hasattr(item, "model_dump"):
        return item.model_dump(exclude_unset=True)
    return {}


def _message_text(item: dict[str, Any]) -> str:
    content = item.get("content")
    if isinstance(content, str):
        return content
    parts = content if isinstance(content, list) else []
    return "".join(
        _as_dict(part).get("text", "") or _as_dict(part).get("refusal", "") for part in parts
    )


@dataclass(frozen=True)
class Transcript:
    """What the demo model needs from its input: the last user turn and what followed it."""

    user_message: str
    earlier_user_messages: int
    tool_calls: dict[str, dict[str, Any]]
    tool_outputs: dict[str, str]
    delay_seconds: float = 0.0

    @classmethod
    def from_input(cls, model_input: str | list[TResponseInputItem]) -> Transcript:
        items = (
            [{"role": "user", "content": model_input}]
            if isinstance(model_input, str)
            else [_as_dict(item) for item in model_input]
        )
        user_indexes = [i for i, item in enumerate(items) if item.get("role") == "user"]
        last_user = user_indexes[-1] if user_indexes else -1
        user_message = _message_text(items[last_user]) if user_indexes else ""
        calls: dict[str, dict[str, Any]] = {}
        outputs: dict[str, str] = {}
        for item in items[last_user + 1 :]:
            if item.get("type") == "function_call":
                calls[item.get("call_id", "")] = item
            elif item.get("type") == "function_call_output":
                output = item.get("output")
                outputs[item.get("call_id", "")] = (
                    output if isinstance(output, str) else json.dumps(output)
                )
        delay = 0.0
        slow = _SLOW.match(user_message)
        if slow:
            user_message = user_message[slow.end() :]
            # Only the turn's first model call thinks slowly, not the ones after tool calls.
            if not calls and not outputs:
                delay = min(float(slow.group(1)), MAX_DELAY_SECONDS)
        return cls(user_message, max(len(user_indexes) - 1, 0), calls, outputs, delay)

    def results_for(self, tool_names: set[str]) -> list[tuple[str, dict[str, Any], str]]:
        """(tool name, arguments, output) for this turn's completed calls of these tools."""
        results = []
        for call_id, call in self.tool_calls.items():
            if call.get("name") in tool_names and call_id in self.tool_outputs:
                try:
                    arguments = json.loads(call.get("arguments") or "{}")
                except ValueError:
                    arguments = {}
                results.append((call["name"], arguments, self.tool_outputs[call_id]))
        return results


def _format_result(name: str, arguments: dict[str, Any], output: str) -> str:
    if output.startswith("Error:"):
        return f"- `{name}` could not help: {output.removeprefix('Error:').strip()}"
    if name == "calculate":
        return f"- `{arguments.get('expression', '')}` = **{output}**"
    if name == "current_utc_time":
        return f"- The current UTC time is **{output}**."
    if name == "word_count":
        return f"- That text has {output}."
    if name == "send_team_note" and not output.startswith("Note sent"):
        return f"- The note was not sent: {output}"
    return f"- {output}"


def _answer_from_tools(results: list[tuple[str, dict[str, Any], str]]) -> str:
    lines = ["Here is what my tools found:", ""]
    lines += [_format_result(name, arguments, output) for name, arguments, output in results]
    return "\n".join(lines)


def _small_talk(transcript: Transcript, can_use_tools: bool) -> str:
    message = transcript.user_message.strip()
    opening = "Hello! " if _GREETING.match(message) else ""
    memory = (
        f"I remember {transcript.earlier_user_messages} earlier message(s) in this conversation. "
        if transcript.earlier_user_messages
        else ""
    )
    quoted = "\n".join(f"> {line}" for line in message.splitlines()[:6]) or "> (empty message)"
    tools_hint = (
        "Try one of these to see a tool call:\n\n"
        "- *What time is it?*\n"
        "- *What is (12 + 7) \\* 3?*\n"
        "- *Convert 10 km to miles*\n"
        '- *Count the words in "the quick brown fox"*\n'
        "- *Send a note to the team: the demo works* (asks for your approval first)"
        if can_use_tools
        else "This agent has no tools; switch to one that does for calculations."
    )
    return (
        f"{opening}You said:\n\n{quoted}\n\n"
        f"I'm the **offline demo model**, so I can only echo and use the sample tools. "
        f"{memory}Set `OPENAI_API_KEY` in `.env` to talk to a real model.\n\n{tools_hint}"
    )


def _estimate_tokens(text: str) -> int:
    return max(1, len(text) // 4)


class DemoModel(Model):
    """A deterministic offline model: calls the sample tools when asked, otherwise answers."""

    # Its name in the usage ledger (priced by AGENTIC_DJANGO_MODEL_PRICES: free).
    model = "demo"

    def respond(
        self,
        model_input: str | list[TResponseInputItem],
        tools: Sequence[Tool],
        handoffs: Sequence[Handoff],
    ) -> list[TResponseOutputItem]:
        """Decide this turn's output items from the conversation so far."""
        transcript = Transcript.from_input(model_input)
        tool_names = {tool.name for tool in tools}
        results = transcript.results_for(tool_names)
        if results:
            return [assistant_message(_answer_from_tools(results), item_id=_new_id("msg"))]
        wanted = plan_tool_requests(transcript.user_message)
        usable = [request for request in wanted if request.name in tool_names]
        if usable:
            return [
                function_call(request.name, request.arguments, call_id=_new_id("call"))
                for request in usable
            ]
        if wanted and handoffs:
            return [function_call(handoffs[0].tool_name, {}, call_id=_new_id("call"))]
        can_use_tools = bool(tool_names) or bool(handoffs)
        text = _small_talk(transcript, can_use_tools)
        return [assistant_message(text, item_id=_new_id("msg"))]

    def _step(
        self,
        model_input: str | list[TResponseInputItem],
        tools: Sequence[Tool],
        handoffs: Sequence[Handoff],
    ) -> ModelStep:
        output = self.respond(model_input, tools, handoffs)
        prompt_tokens = _estimate_tokens(json.dumps(model_input, default=str))
        completion_tokens = sum(_estimate_tokens(item.model_dump_json()) for item in output)
        usage = Usage(
            requests=1,
            input_tokens=prompt_tokens,
            output_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )
        return ModelStep(output=output, usage=usage, response_id=_new_id("resp"))

    async def get_response(
        self,
        system_instructions: str | None,
        input: str | list[TResponseInputItem],
        model_settings: ModelSettings,
        tools: list[Tool],
        output_schema: AgentOutputSchemaBase | None,
        handoffs: list[Handoff],
        tracing: ModelTracing,
        *,
        previous_response_id: str | None,
        conversation_id: str | None,
        prompt: ResponsePromptParam | None,
    ) -> ModelResponse:
        await asyncio.sleep(Transcript.from_input(input).delay_seconds)
        step = self._step(input, tools, handoffs)
        return ModelResponse(
            output=list(step.output), usage=step.usage, response_id=step.response_id
        )

    async def stream_response(
        self,
        system_instructions: str | None,
        input: str | list[TResponseInputItem],
        model_settings: ModelSettings,
        tools: list[Tool],
        output_schema: AgentOutputSchemaBase | None,
        handoffs: list[Handoff],
        tracing: ModelTracing,
        *,
        previous_response_id: str | None,
        conversation_id: str | None,
        prompt: ResponsePromptParam | None,
    ) -> AsyncIterator[TResponseStreamEvent]:
        await asyncio.sleep(Transcript.from_input(input).delay_seconds)
        # The SDK's scripted model turns one decided step into a faithful Responses event stream.
        scripted = ScriptedModel([self._step(input, tools, handoffs)])
        async for event in scripted.stream_response(
            system_instructions,
            input,
            model_settings,
            tools,
            output_schema,
            handoffs,
            tracing,
            previous_response_id=previous_response_id,
            conversation_id=conversation_id,
            prompt=prompt,
        ):
            yield event


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"
