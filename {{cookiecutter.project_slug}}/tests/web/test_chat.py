"""The chat sample app: pages, the conversation list, login/logout and the demo_user command."""

from __future__ import annotations

import json
import re
from io import StringIO

import pytest
from django.contrib.auth import authenticate
from django.core.management import call_command
from django.urls import reverse

from tests.web.conftest import HTMX

pytestmark = pytest.mark.django_db(transaction=True)


def _send(client, text, key):
    return client.post(
        reverse("agents:run-create"),
        data=json.dumps({"input": text, "session_key": key}),
        content_type="application/json",
    )


def test_index_is_a_new_chat_with_a_composer(api):
    response = api.get(reverse("chat:index"))

    assert response.status_code == 200
    html = response.content.decode()
    key = re.search(r'name="session_key" value="([0-9a-f]{32})"', html).group(1)
    assert f'hx-replace-url="/c/{key}/"' in html
    assert f'hx-post="{reverse("agents:run-create")}"' in html
    assert '<label for="message"' in html
    assert "How can I help?" in html


def test_pages_follow_the_strict_csp(api):
    response = api.get(reverse("chat:index"))
    html = response.content.decode()

    policy = response["Content-Security-Policy"]
    assert "script-src 'self'" in policy and "unsafe-inline" not in policy
    assert not re.search(r"<script(?![^>]*\bsrc=)", html)  # no inline scripts
    assert "<style" not in html and " style=" not in html
    assert " hx-on" not in html
    assert "/static/django_htmx/htmx-2.min.js" in html  # htmx served locally
    assert '"allowEval": false' in html and '"includeIndicatorStyles": false' in html


def test_a_conversation_page_shows_its_turns(api):
    _send(api, "What is 2 + 3?", "conv")
    _send(api, "thanks!", "conv")
    html = api.get(reverse("chat:conversation", args=["conv"])).content.decode()

    assert html.index("What is 2 + 3?") < html.index("thanks!")
    assert "calculate(expression=" in html
    assert "<strong>5</strong>" in html
    assert "How can I help?" not in html


def test_the_conversation_list_is_titled_by_first_message_newest_first(api):
    _send(api, "first conversation", "one")
    _send(api, "second conversation", "two")
    response = api.get(reverse("chat:conversation-list"), {"current": "two"}, headers=HTMX)

    html = response.content.decode()
    assert html.index("second conversation") < html.index("first conversation")
    assert 'href="/c/two/" class="is-current" aria-current="page"' in html


def test_the_conversation_list_redirects_anonymous_htmx_to_login(client):
    response = client.get(reverse("chat:conversation-list"), headers=HTMX)
    assert response["HX-Redirect"].startswith("/accounts/login/")


def test_chat_pages_require_login(client):
    for url in (reverse("chat:index"), reverse("chat:conversation", args=["x"])):
        response = client.get(url)
        assert response.status_code == 302
        assert response["Location"].startswith("/accounts/login/")


def test_login_and_logout_by_post(client, user):
    page = client.get(reverse("login"))
    assert 'autocomplete="current-password"' in page.content.decode()

    response = client.post(reverse("login"), {"username": "alice", "password": "correct-horse-42"})
    assert response.status_code == 302 and response["Location"] == reverse("chat:index")
    assert client.get(reverse("chat:index")).status_code == 200

    assert client.get(reverse("logout")).status_code == 405
    assert client.post(reverse("logout")).status_code == 302
    assert client.get(reverse("chat:index")).status_code == 302


def test_wrong_password_shows_an_error(client, user):
    response = client.post(reverse("login"), {"username": "alice", "password": "nope"})
    assert response.status_code == 200
    assert 'role="alert"' in response.content.decode()


def test_demo_user_creates_then_resets_the_login():
    out = StringIO()
    call_command("demo_user", stdout=out)
    first = re.search(r"Password:\s+(\S+)", out.getvalue()).group(1)
    assert "http://127.0.0.1:8000/accounts/login/" in out.getvalue()
    assert authenticate(username="demo", password=first) is not None

    out = StringIO()
    call_command("demo_user", "--base-url", "https://chat.example.com/", stdout=out)
    second = re.search(r"Password:\s+(\S+)", out.getvalue()).group(1)
    assert "https://chat.example.com/accounts/login/" in out.getvalue()
    assert second != first
    assert authenticate(username="demo", password=first) is None
    assert authenticate(username="demo", password=second) is not None
