"""What the PostgreSQL and browser tests need, in one place: the header of every test run
(tests/conftest.py) and the reason the browser tests give when they skip use it."""

from __future__ import annotations

import os
from pathlib import Path

SYSTEM_CHROMIUM = "/usr/bin/chromium"
INSTALL_CHROMIUM = (
    "sudo apt-get install chromium, set CHROMIUM_PATH, "
    "or uv run playwright install --with-deps chromium"
)
POSTGRES_NEEDS = (
    "tests marked postgres are skipped: DATABASE_URL is not PostgreSQL "
    "(point it at a PostgreSQL database, as a user who may create databases)"
)
BROWSER_NEEDS = (
    f"tests marked browser are skipped unless Playwright has a Chromium of its own: there is "
    f"none at $CHROMIUM_PATH or {SYSTEM_CHROMIUM} ({INSTALL_CHROMIUM})"
)


def chromium_executable() -> str | None:
    """$CHROMIUM_PATH, else the system Chromium; None leaves it to Playwright's own."""
    for candidate in (os.environ.get("CHROMIUM_PATH"), SYSTEM_CHROMIUM):
        if candidate and Path(candidate).exists():
            return candidate
    return None


def missing(database_vendor: str) -> list[str]:
    """One line for each kind of test this machine leaves out, saying what it needs."""
    lines = []
    if database_vendor != "postgresql":
        lines.append(POSTGRES_NEEDS)
    if chromium_executable() is None:
        lines.append(BROWSER_NEEDS)
    return lines
