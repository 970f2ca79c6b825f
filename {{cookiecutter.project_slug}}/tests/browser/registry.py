"""Registry for the browser tests: the web tests' agents (the sample ones and `broken`) plus
`wide`, whose tool call and reply are as hard to fit on a narrow screen as model output gets
(a long unbroken word, a code block with a long line, a long link, a table of many columns)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from agents import Agent
from agents.testing import ModelStep, ScriptedModel, assistant_message, function_call

from chat.tools import TOOLS
from tests.web.registry import get_agent_registry as web_registry

LONG_WORD = "Rindfleischetikettierungsueberwachungsaufgabenuebertragungsgesetz" * 2
COLUMNS = ["Quantity", "Temperature", "Pressure", "Humidity", "Visibility", "Direction"]
CODE_LINE = (
    "result = {key: transform(value, mode='strict') for key, value in items.items() if value}"
)
WIDE_REPLY = f"""Here is {LONG_WORD}, then some code:

```python
{CODE_LINE}  # {LONG_WORD}
```

See https://example.com/{LONG_WORD}/{LONG_WORD}

| {" | ".join(COLUMNS)} |
| {" | ".join(["---"] * len(COLUMNS))} |
| {" | ".join(["1234567.89"] * len(COLUMNS))} |
"""


def build_wide() -> Agent:
    return Agent(
        name="Wide",
        tools=TOOLS,
        model=ScriptedModel(
            [
                ModelStep(output=[function_call("word_count", {"text": LONG_WORD}, call_id="c1")]),
                ModelStep(output=[assistant_message(WIDE_REPLY)]),
            ]
        ),
    )


def get_agent_registry() -> dict[str, Callable[[], Any]]:
    return {**web_registry(), "wide": build_wide}
