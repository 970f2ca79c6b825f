"""Settings of the web process tests/web/live.py starts: the project's, with a pool that closes a
connection it has not needed for half a second (psycopg's default waits ten minutes), so that a
connection still open after a while is one a request or a stream holds, not one the pool keeps."""

from config.settings import *  # noqa: F403

_pool = DATABASES["default"].get("OPTIONS", {}).get("pool")  # noqa: F405
if isinstance(_pool, dict):
    _pool["max_idle"] = 0.5
