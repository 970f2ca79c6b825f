"""Check real responses against the OpenAPI description: status, media type, headers, body."""

from __future__ import annotations

import json
from functools import cache
from typing import Any

from django.http import HttpResponse
from jsonschema import Draft202012Validator

from agentic_django.openapi import build_spec


@cache
def spec() -> dict[str, Any]:
    return build_spec()


def operations() -> dict[str, tuple[str, str, dict[str, Any]]]:
    """``{operationId: (path, method, operation)}`` of the description."""
    return {
        operation["operationId"]: (path, method, operation)
        for path, item in spec()["paths"].items()
        for method, operation in item.items()
    }


def documented_statuses() -> set[tuple[str, int]]:
    return {
        (operation_id, int(status))
        for operation_id, (_, _, operation) in operations().items()
        for status in operation["responses"]
    }


def validator(schema: dict[str, Any]) -> Draft202012Validator:
    # Component references resolve against the description itself.
    root = {**schema, "components": spec()["components"]}
    return Draft202012Validator(root, format_checker=Draft202012Validator.FORMAT_CHECKER)


def schema_errors(schema: dict[str, Any], instance: Any) -> list[str]:
    return [
        f"{'/'.join(map(str, error.absolute_path)) or '<body>'}: {error.message}"
        for error in validator(schema).iter_errors(instance)
    ]


def response_problems(operation_id: str, response: HttpResponse) -> list[str]:
    """Ways ``response`` departs from what the description documents for ``operation_id``."""
    _, _, operation = operations()[operation_id]
    documented = operation["responses"].get(str(response.status_code))
    if documented is None:
        return [f"status {response.status_code} is not documented for {operation_id}"]
    problems = [
        f"required header {name} is missing"
        for name, header in documented.get("headers", {}).items()
        if header.get("required") and not response.has_header(name)
    ]
    content = documented.get("content")
    media_type = response.get("Content-Type", "").split(";")[0].strip()
    if not content:
        if response.content:
            problems.append(f"status {response.status_code} documents no body")
        return problems
    if media_type not in content:
        return [*problems, f"media type {media_type!r} is not one of {sorted(content)}"]
    if media_type == "application/json":
        body = json.loads(response.content)
        problems += schema_errors(content[media_type]["schema"], body)
    return problems
