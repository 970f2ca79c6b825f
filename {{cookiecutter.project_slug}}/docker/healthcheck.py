"""Container health check: exit 0 when the local web server answers GET /healthz/ with 200.

The slim image has no curl. The request carries an allowed Host header, so the check keeps
working once ALLOWED_HOSTS lists only the public domain.
"""

from __future__ import annotations

import http.client
import os
import sys


def allowed_host() -> str:
    """The first concrete entry of ALLOWED_HOSTS (".example.com" allows "example.com")."""
    for host in os.environ.get("ALLOWED_HOSTS", "").split(","):
        host = host.strip().lstrip(".")
        if host and host != "*":
            return host
    return "localhost"


def main() -> int:
    port = int(os.environ.get("PORT", "8000"))
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=4)
    try:
        connection.request("GET", "/healthz/", headers={"Host": allowed_host()})
        response = connection.getresponse()
    except OSError as error:
        print(f"unhealthy: {error}", file=sys.stderr)
        return 1
    finally:
        connection.close()
    if response.status != 200:
        print(f"unhealthy: /healthz/ answered {response.status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
