"""Security checks: owner isolation on every endpoint, admin, CSRF, CSP, deploy settings, secrets.

The rate limit under concurrent requests is covered by tests/web/test_ratelimit.py.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
from django.conf import settings
from django.test import Client
from django.urls import URLPattern, URLResolver, get_resolver, reverse

from agentic_django import services
from agentic_django.models import AgentEvent, AgentRun, AgentSession, AgentSessionItem
from agentic_django.openapi import openapi_view
from tests.reliability import spec
from tests.reliability.conftest import HTMX

BASE_DIR = Path(settings.BASE_DIR)
SECRET = "the launch code is 0000"
FORMATS = {"json": {"Accept": "application/json"}, "htmx": HTMX}


@pytest.fixture
def victim(other_user, django_capture_on_commit_callbacks):
    """Another user's finished run, with events and conversation items."""
    with django_capture_on_commit_callbacks(execute=True):
        run = services.create_run(owner=other_user, session_key="plans", input_payload=SECRET)
    run.refresh_from_db()
    assert run.events.exists() and run.session.items.exists()
    return run


@pytest.fixture
def attacker(client, user):
    client.force_login(user)
    return client


# --- owner isolation: every operation of the API description, in every format ---------------


def _operations_with_ids() -> list[tuple[str, str, str]]:
    return [
        (operation_id, path, method)
        for operation_id, (path, method, _) in spec.operations().items()
        if "{" in path
    ]


@pytest.mark.django_db
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(
    ("operation_id", "path", "method"), _operations_with_ids(), ids=lambda v: str(v)
)
def test_another_users_ids_are_404_and_reveal_nothing(
    attacker, victim, operation_id, path, method, fmt
):
    status_before = victim.status
    target = "/agents" + path.format(run_id=victim.id, session_key=victim.session.session_key)

    response = getattr(attacker, method)(target, headers=FORMATS[fmt])

    assert response.status_code == 404, (operation_id, response.status_code)
    assert SECRET not in response.content.decode()
    assert spec.response_problems(operation_id, response) == []
    victim.refresh_from_db()
    assert victim.status == status_before
    assert victim.cancel_requested_at is None


@pytest.mark.django_db
def test_every_operation_taking_an_id_is_in_the_matrix():
    # Guards the matrix above: a new endpoint with an id in its path joins it automatically.
    assert {op for op, _, _ in _operations_with_ids()} == {
        "run-detail",
        "run-fragment",
        "run-inspect",
        "run-trace",
        "run-events",
        "run-stream",
        "run-cancel",
        "run-approve",
        "run-reject",
        "session-items",
    }


@pytest.mark.django_db
def test_reusing_another_users_session_key_never_joins_their_conversation(attacker, user, victim):
    key = victim.session.session_key
    response = attacker.post(
        reverse("agents:run-create"),
        data=json.dumps({"input": "what did we talk about?", "session_key": key}),
        content_type="application/json",
    )

    assert response.status_code == 201
    assert AgentRun.objects.get(pk=response.json()["id"]).owner == user
    history = attacker.get(reverse("agents:session-items", args=[key]))
    assert SECRET not in history.content.decode()
    assert victim.session.runs.count() == 1
    for page in (reverse("chat:conversation", args=[key]), reverse("chat:index")):
        assert SECRET not in attacker.get(page).content.decode()


# --- the admin: staff only -------------------------------------------------------------------


def _admin_pages(run: AgentRun) -> list[str]:
    event = run.events.first()
    item = run.session.items.first()
    pages = []
    for model, obj in (
        (AgentRun, run),
        (AgentSession, run.session),
        (AgentEvent, event),
        (AgentSessionItem, item),
    ):
        name = f"admin:{model._meta.app_label}_{model._meta.model_name}"
        pages += [reverse(f"{name}_changelist"), reverse(f"{name}_change", args=[obj.pk])]
    return pages


@pytest.mark.django_db
def test_the_admin_of_runs_sessions_and_events_needs_staff(victim, django_user_model):
    pages = _admin_pages(victim)
    anonymous = Client()
    member = Client()
    member.force_login(django_user_model.objects.create_user("member", password="x" * 20))
    staff = Client()
    staff.force_login(
        django_user_model.objects.create_user("staff", password="x" * 20, is_staff=True)
    )
    admin = Client()
    admin.force_login(django_user_model.objects.create_superuser("root", password="x" * 20))

    for page in pages:
        for client in (anonymous, member):
            response = client.get(page)
            assert response.status_code == 302, page
            assert response["Location"].startswith(reverse("admin:login")), page
            assert SECRET not in response.content.decode()
        # Staff without the model permissions are refused too.
        assert staff.get(page).status_code == 403, page
        assert admin.get(page).status_code == 200, page
    assert SECRET in admin.get(pages[1]).content.decode()  # positive control


# --- CSRF on every POST --------------------------------------------------------------------


def _csrf_token(client: Client) -> str:
    client.get(reverse("login"))
    return client.cookies[settings.CSRF_COOKIE_NAME].value


def _post_targets(run: AgentRun) -> dict[str, tuple[str, dict[str, str]]]:
    return {
        "run-create": (reverse("agents:run-create"), {"input": "hi"}),
        "run-cancel": (reverse("agents:run-cancel", args=[run.id]), {}),
        "logout": (reverse("logout"), {}),
        "admin-action": (
            reverse("admin:agentic_django_agentrun_changelist"),
            {"action": "cancel_selected", "_selected_action": str(run.id)},
        ),
    }


@pytest.mark.django_db
@pytest.mark.parametrize("target", ["run-create", "run-cancel", "logout", "admin-action"])
def test_posts_without_the_csrf_token_are_refused(django_user_model, make_run, target):
    owner = django_user_model.objects.create_superuser("root", password="x" * 20)
    run = make_run(owner)
    path, data = _post_targets(run)[target]
    browser = Client(enforce_csrf_checks=True)
    browser.force_login(owner)

    refused = browser.post(path, data, headers=HTMX)
    assert refused.status_code == 403
    run.refresh_from_db()
    assert run.status == AgentRun.Status.PENDING
    assert AgentRun.objects.count() == 1

    # Positive control: the same request with the token goes through.
    token = _csrf_token(browser)
    accepted = browser.post(path, data, headers={**HTMX, "X-CSRFToken": token})
    assert accepted.status_code in (200, 302), accepted.content[:300]


@pytest.mark.django_db
def test_the_login_form_needs_the_csrf_token(user):
    browser = Client(enforce_csrf_checks=True)
    form = {"username": "alice", "password": "correct-horse-42"}

    assert browser.post(reverse("login"), form).status_code == 403
    token = _csrf_token(browser)
    response = browser.post(reverse("login"), {**form, "csrfmiddlewaretoken": token})
    assert response.status_code == 302


def _views(resolver: URLResolver, prefix: str = "") -> list[tuple[str, object]]:
    found = []
    for entry in resolver.url_patterns:
        if isinstance(entry, URLResolver):
            found += _views(entry, prefix + str(entry.pattern))
        elif isinstance(entry, URLPattern):
            found.append((prefix + str(entry.pattern), entry.callback))
    return found


def test_no_view_is_exempt_from_csrf_except_the_read_only_description():
    exempt = {
        route
        for route, callback in _views(get_resolver())
        if getattr(callback, "csrf_exempt", False)
    }
    assert exempt == {"agents/openapi.json"}
    assert Client().post(reverse("agents:openapi")).status_code == 405
    assert openapi_view.csrf_exempt


# --- Content Security Policy ---------------------------------------------------------------


def _policy(header: str) -> dict[str, list[str]]:
    directives = (part.strip().split() for part in header.split(";") if part.strip())
    return {name: values for name, *values in directives}


@pytest.mark.django_db
@pytest.mark.parametrize("page", ["chat", "login"])
def test_pages_send_a_strict_content_security_policy(client, user, page):
    if page == "chat":
        client.force_login(user)
    response = client.get(reverse("chat:index" if page == "chat" else "login"))

    assert response.status_code == 200
    header = response["Content-Security-Policy"]
    policy = _policy(header)
    assert "'unsafe-inline'" not in header and "'unsafe-eval'" not in header
    assert policy["script-src"] == ["'self'"]
    assert policy["style-src"] == ["'self'"]
    assert policy["default-src"] == ["'self'"]
    assert policy["object-src"] == ["'none'"]
    assert policy["frame-ancestors"] == ["'none'"]
    assert response["X-Content-Type-Options"] == "nosniff"
    assert response["X-Frame-Options"] == "DENY"
    # The page itself must work under that policy: no inline code or styles, nothing off-site.
    html = response.content.decode()
    assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", html)
    assert not re.search(r"<style[\s>]", html)
    assert not re.search(r"\s(on[a-z]+|style)\s*=", html)
    for src in re.findall(r'<(?:script|link)[^>]+(?:src|href)="([^"]+)"', html):
        assert src.startswith(settings.STATIC_URL) or src.startswith("/"), src


# --- production settings -------------------------------------------------------------------


def test_check_deploy_is_clean_with_production_settings():
    env = {
        **os.environ,
        "DEBUG": "False",
        "SECRET_KEY": secrets.token_urlsafe(50),
        "ALLOWED_HOSTS": "agents.example.com",
        "CSRF_TRUSTED_ORIGINS": "https://agents.example.com",
    }
    result = subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "DEBUG"],
        cwd=BASE_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no issues" in result.stdout


# --- secrets stay out of the repository and the image --------------------------------------

SKIP_DIRS = {
    ".git",
    ".venv",
    "venv",
    "node_modules",
    "__pycache__",
    "staticfiles",
    "media",
    "test-artifacts",
    ".pytest_cache",
    ".ruff_cache",
    ".mypy_cache",
    ".hypothesis",
}
# .env holds this checkout's own secret: git- and docker-ignored (checked below), never committed.
SKIP_FILES = {".env", "db.sqlite3", "db.sqlite3-shm", "db.sqlite3-wal"}
SECRET_PATTERNS = {
    "OpenAI key": re.compile(r"\bsk-(?:proj-)?[A-Za-z0-9_-]{20,}"),
    "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "AWS key": re.compile(r"\bAKIA[0-9A-Z]{16}\b"),
    "GitHub token": re.compile(r"\bgh[pousr]_[A-Za-z0-9]{30,}"),
}
# A SECRET_KEY given a literal, key-length value; placeholders are lower-case words with dashes.
SECRET_KEY_VALUE = re.compile(r"SECRET_KEY\s*[=:]\s*[\"']?([^\s\"'$|]+)")
PLACEHOLDER = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")


def _project_files() -> list[Path]:
    files = []
    for root, dirs, names in os.walk(BASE_DIR, followlinks=True):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS]
        files += [Path(root, name) for name in names if name not in SKIP_FILES]
    return files


def test_no_secret_is_committed_to_the_project():
    found = []
    files = _project_files()
    for path in files:
        try:
            text = path.read_text()
        except (UnicodeDecodeError, OSError):
            continue
        for kind, pattern in SECRET_PATTERNS.items():
            found += [f"{path}: {kind}" for _ in pattern.finditer(text)]
        for value in SECRET_KEY_VALUE.findall(text):
            if len(value) >= 16 and not PLACEHOLDER.fullmatch(value):
                found.append(f"{path}: SECRET_KEY literal {value[:6]}...")
    assert len(files) > 50  # the walk really covered the project
    assert found == []


def _ignored(patterns: list[str], path: str) -> bool:
    ignored = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        if fnmatch.fnmatch(path, pattern.removeprefix("!").removeprefix("/")):
            ignored = not negated
    return ignored


def test_env_files_stay_out_of_git_and_the_docker_build_context():
    def patterns(name: str) -> list[str]:
        lines = (BASE_DIR / name).read_text().splitlines()
        return [line.strip() for line in lines if line.strip() and not line.startswith("#")]

    docker = patterns(".dockerignore")
    for name in (".env", ".env.local", ".env.production"):
        assert _ignored(docker, name), name
    assert not _ignored(docker, ".env.example")
    assert _ignored(patterns(".gitignore"), ".env")
    assert not re.search(r"^\s*(COPY|ADD)\b.*\.env\b", (BASE_DIR / "Dockerfile").read_text(), re.M)
