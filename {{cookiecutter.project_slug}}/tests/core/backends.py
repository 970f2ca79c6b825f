"""A task backend whose broker is always down, to test enqueue failures."""

from __future__ import annotations

from typing import Any

from django.tasks.backends.base import BaseTaskBackend


class UnavailableBackend(BaseTaskBackend):
    supports_async_task = True

    def enqueue(self, task: Any, args: Any, kwargs: Any) -> Any:
        raise ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")
