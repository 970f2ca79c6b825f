from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import requests
from django.conf import settings

# Hypothesis' caches go with the other test output (git- and docker-ignored), not the project root.
os.environ.setdefault(
    "HYPOTHESIS_STORAGE_DIRECTORY",
    str(Path(settings.BASE_DIR) / "test-artifacts" / "hypothesis"),
)

HTMX = {"HX-Request": "true"}
PASSWORD = "correct-horse-42"


@pytest.fixture(autouse=True)
def _reliability_settings(settings):
    """The project's own agents (config/settings.py), events on, no rate limit."""
    # Fuzzing creates many runs; the limit itself is tested in tests/web/test_ratelimit.py.
    settings.AGENTIC_DJANGO_RATE_LIMIT = None
    settings.AGENTIC_DJANGO_ENABLE_EVENTS = True


def login(base_url: str, username: str, password: str = PASSWORD) -> requests.Session:
    """Log in through the real login form; the session then sends the CSRF token header too."""
    session = requests.Session()
    page = session.get(f"{base_url}/accounts/login/", timeout=30)
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text)
    assert token, "the login page has no CSRF token"
    response = session.post(
        f"{base_url}/accounts/login/",
        data={"username": username, "password": password, "csrfmiddlewaretoken": token[1]},
        headers={"Referer": f"{base_url}/accounts/login/"},
        allow_redirects=False,
        timeout=30,
    )
    assert response.status_code == 302, "login failed"
    # Logging in rotates the CSRF token; unsafe requests must send the new one.
    session.headers["X-CSRFToken"] = session.cookies["csrftoken"]
    return session
