"""What a web process does once its application is loaded (config/asgi.py, config/wsgi.py)."""

import threading

from django.conf import settings

IMMEDIATE_BACKEND = "django.tasks.backends.immediate.ImmediateBackend"


def runs_agents_here() -> bool:
    """Whether runs execute in the web process: only with the immediate task backend."""
    return settings.TASKS.get("default", {}).get("BACKEND") == IMMEDIATE_BACKEND


def start() -> None:
    """A web process creates runs, serves pages and streams: workers run the agents, so it
    never loads the Agents SDK, and it starts (and reloads) at once. With the immediate
    backend it runs them itself, in the request: it loads and warms the SDK in the background
    (serving meanwhile), so the first run seldom pays for it."""
    if not runs_agents_here():
        return
    from agentic_django.workers import preload

    threading.Thread(target=preload, name="agentic-django-preload", daemon=True).start()
