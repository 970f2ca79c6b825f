"""Schemathesis fuzzes every operation of the served OpenAPI description against a live server.

A real user logs in through the login form; schemathesis then sends the session cookie and the
CSRF cookie and header as the description's security schemes say. Its coverage phase (boundary
and schema-violating values, missing parameters, other HTTP methods), fuzzing phase (random
positive and negative cases, reusing ids from earlier responses) and stateful phase (create a
run, then read, page and cancel it) run with a fixed seed. Every response must be documented
(status, content type, headers, body schema), schema-violating requests must be rejected with a
4xx, and no response may be a 5xx. Per-phase, per-operation status counts are written to
``test-artifacts/fuzz_api.json``.
"""

from __future__ import annotations

import gc
import json
import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from django.conf import settings
from schemathesis.config import SchemathesisConfig
from schemathesis.engine import events, from_schema

from agentic_django.models import AgentRun
from tests.reliability.conftest import login

pytestmark = pytest.mark.slow

CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
    "response_headers_conformance",
    "negative_data_rejection",
    "unsupported_method",
    "ignored_auth",
)
# Examples per operation in the fuzzing phase; raise it for a deeper run (FUZZ_EXAMPLES=500).
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "25"))
SEED = int(os.environ.get("FUZZ_SEED", "7"))
ARTIFACT = Path(settings.BASE_DIR) / "test-artifacts" / "fuzz_api.json"


@dataclass
class FuzzReport:
    statuses: dict[str, dict[str, Counter]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(Counter))
    )
    failures: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def record(self, phase: str, recorder: Any) -> None:
        for interaction in recorder.interactions.values():
            if interaction.response is not None:
                self.statuses[phase][recorder.label][interaction.response.status_code] += 1
        for case_id, checks in recorder.checks.items():
            for check in checks:
                if check.failure_info is not None:
                    failure = check.failure_info.failure
                    request = getattr(recorder.interactions.get(case_id), "request", None)
                    sent = f" ({request.method} {request.uri})" if request is not None else ""
                    self.failures.append(f"{recorder.label}: {check.name}: {failure.title}{sent}")

    def count(self, predicate: Any = lambda status: True) -> int:
        return sum(
            n
            for operations in self.statuses.values()
            for counts in operations.values()
            for status, n in counts.items()
            if predicate(status)
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "seed": SEED,
            "examples_per_operation": EXAMPLES,
            "requests": self.count(),
            "server_errors": self.count(lambda status: status >= 500),
            "statuses": {
                phase: {label: dict(sorted(c.items())) for label, c in sorted(ops.items())}
                for phase, ops in self.statuses.items()
            },
        }


def run_schemathesis(schema: Any) -> FuzzReport:
    report = FuzzReport()
    for event in from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished | events.FuzzScenarioFinished):
            phase = getattr(event, "phase", "fuzzing")
            report.record(getattr(phase, "value", str(phase)), event.recorder)
        elif isinstance(event, events.NonFatalError | events.FatalError):
            report.errors.append(repr(event))
    # Drop the engine's HTTP sessions now: their kept-alive sockets pin live-server threads.
    gc.collect()
    return report


@pytest.fixture
def http(live_server, django_user_model, make_run):
    """A requests session logged in as a user who already has a finished run."""
    user = django_user_model.objects.create_user(username="fuzzer", password="correct-horse-42")
    make_run(user, session_key="fuzz", status=AgentRun.Status.COMPLETED, with_event=True)
    session = login(live_server.url, "fuzzer")
    yield session
    # A kept-alive socket pins a live-server thread and its database connection.
    session.close()


@pytest.mark.django_db(transaction=True)
def test_every_operation_survives_fuzzing(live_server, http):
    csrf = http.cookies[settings.CSRF_COOKIE_NAME]
    config = SchemathesisConfig.from_dict(
        {
            "seed": SEED,
            "workers": 1,
            "max-redirects": 0,
            "base-url": f"{live_server.url}/agents/",
            # No example database: the same seed gives the same run everywhere.
            "generation": {
                "mode": "all",
                "max-examples": EXAMPLES,
                "database": "none",
                "allow-x00": True,
            },
            "phases": {"examples": {"enabled": False}},
            "checks": {
                "enabled": False,
                **{name: {"enabled": True} for name in CHECKS},
                # 413 is how an oversized input is rejected.
                "negative_data_rejection": {"enabled": True, "expected-statuses": ["4XX"]},
            },
            "auth": {
                "openapi": {
                    "sessionCookie": {"api_key": http.cookies[settings.SESSION_COOKIE_NAME]},
                    "csrfCookie": {"api_key": csrf},
                    "csrfHeader": {"api_key": csrf},
                }
            },
        }
    )
    served = http.get(f"{live_server.url}/agents/openapi.json", timeout=30).json()
    schema = schemathesis.openapi.from_dict(served, config=config)

    report = run_schemathesis(schema)

    ARTIFACT.parent.mkdir(exist_ok=True)
    ARTIFACT.write_text(json.dumps(report.as_dict(), indent=2) + "\n")
    assert report.errors == []
    assert not report.failures, "\n".join(report.failures)
    assert report.count(lambda status: status >= 500) == 0
    operations = {f"{m.upper()} {p}" for p, item in served["paths"].items() for m in item}
    assert set(report.statuses["coverage"]) == operations
    assert set(report.statuses["fuzzing"]) == operations
