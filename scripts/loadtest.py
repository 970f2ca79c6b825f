"""A bounded load generator for a running agentic_django project (loopback only).

Each simulated user logs in over HTTP (CSRF and all), then repeatedly creates a run with the
demo model through the JSON API (`POST /agents/runs/`) and polls the run until it is terminal.
The load stops by itself after `--seconds` (or `--max-requests` HTTP requests); runs still open
then are polled for up to `--drain-seconds` more. The report (printed, and written as JSON)
gives runs/s, latency percentiles, errors by status and every run the clients saw.

    .venv/bin/python scripts/loadtest.py --base-url http://127.0.0.1:8000 \\
        --users 20 --create-users-in /path/to/project --seconds 60 --report load.json

Users are `<prefix><n>` with one password; `--create-users-in` creates them first with
`manage.py shell` in that project (with this process's environment).
"""

from __future__ import annotations

import argparse
import asyncio
import http.cookiejar
import json
import math
import re
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx2 as httpx

FAILED_PAUSE_SECONDS = 1.0
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}
CSRF_INPUT = re.compile(r'name="csrfmiddlewaretoken" value="([^"]+)"')
# Cycled through by every user: small talk, and messages that make the demo model call a tool.
MESSAGES = (
    "Hello there, ref {ref}",
    "What is {a} * {b}? ref {ref}",
    'Count the words in "load test {ref}"',
    "Convert {a} km to miles, ref {ref}",
)


class LoopbackOnly(ValueError):
    """The load generator only sends traffic to this machine."""


@dataclass
class LoadConfig:
    """What to run: against which server, as whom, for how long."""

    base_url: str
    users: list[tuple[str, str]]
    seconds: float = 30.0
    max_requests: int = 100_000
    sessions_per_user: int = 2
    poll_interval: float = 0.25
    drain_seconds: float = 60.0
    request_timeout: float = 15.0
    # The TLS proxy's header: production settings redirect plain HTTP to https.
    forwarded_https: bool = True
    # Every `slow_every`-th run of a user asks the demo model to sleep `slow_seconds` (0: never).
    slow_every: int = 0
    slow_seconds: int = 0
    tag: str = "load"

    def __post_init__(self) -> None:
        host = urlsplit(self.base_url).hostname
        if host not in LOOPBACK_HOSTS:
            raise LoopbackOnly(f"refusing to load {self.base_url}: only 127.0.0.1 is allowed")


@dataclass
class RunRecord:
    """One run as its client saw it."""

    id: str | None
    user: str
    session_key: str
    text: str
    create_status: int | str
    status: str = ""
    finished_at: str | None = None
    error: str = ""
    seconds_to_terminal: float | None = None
    terminal: bool = False
    started: float = 0.0


@dataclass
class Stats:
    """Counters shared by all users (one event loop, so plain ints are safe)."""

    requests: int = 0
    created: int = 0
    terminal: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)
    poll_latencies: list[float] = field(default_factory=list)
    create_latencies: list[float] = field(default_factory=list)
    run_latencies: list[float] = field(default_factory=list)
    runs: list[RunRecord] = field(default_factory=list)
    logins: int = 0


def percentile(values: list[float], pct: float) -> float | None:
    """Nearest-rank percentile, in the values' unit; None without values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[rank - 1]


class _ProxyCookiePolicy(http.cookiejar.DefaultCookiePolicy):
    """Send Secure cookies over the plain-HTTP hop behind the (simulated) TLS proxy."""

    def return_ok_secure(self, cookie, request) -> bool:
        return True


class LoadUser:
    """One simulated user with its own cookies, sessions and runs."""

    def __init__(self, load: LoadTest, index: int, username: str, password: str) -> None:
        self.load = load
        self.config = load.config
        self.stats = load.stats
        self.index = index
        self.username = username
        self.password = password
        self.cookies = http.cookiejar.CookieJar(policy=_ProxyCookiePolicy())
        scheme = "https" if self.config.forwarded_https else "http"
        parts = urlsplit(self.config.base_url)
        self.origin = f"{scheme}://{parts.netloc}"
        headers = {"X-Forwarded-Proto": "https"} if self.config.forwarded_https else {}
        self.client = httpx.AsyncClient(
            base_url=self.config.base_url,
            cookies=self.cookies,
            headers=headers,
            timeout=self.config.request_timeout,
            follow_redirects=False,
            trust_env=False,
        )

    def _csrf_headers(self, path: str) -> dict[str, str]:
        token = next((c.value for c in self.cookies if c.name == "csrftoken"), "")
        return {"Origin": self.origin, "Referer": self.origin + path, "X-CSRFToken": token}

    async def _request(self, method: str, path: str, **kwargs) -> httpx.Response | None:
        """One request; None (counted by exception name) if the connection failed."""
        self.stats.requests += 1
        try:
            return await self.client.request(method, path, **kwargs)
        except httpx.TransportError as error:
            self.stats.errors[type(error).__name__] += 1
            return None

    async def login(self, until: float) -> bool:
        """Log in through the login form; retried (the server may be restarting) until `until`."""
        path = "/accounts/login/"
        while time.monotonic() < until:
            form = await self._request("GET", path)
            token = CSRF_INPUT.search(form.text) if form is not None else None
            if form is not None and form.status_code == 200 and token:
                data = {
                    "username": self.username,
                    "password": self.password,
                    "csrfmiddlewaretoken": token[1],
                }
                response = await self._request(
                    "POST", path, data=data, headers=self._csrf_headers(path)
                )
                if response is not None and response.status_code == 302:
                    if "/accounts/login/" not in response.headers.get("location", ""):
                        self.stats.logins += 1
                        return True
                    raise RuntimeError(f"login refused for {self.username}")
                if response is not None:
                    self.stats.errors[f"login {response.status_code}"] += 1
            elif form is not None:
                self.stats.errors[f"login {form.status_code}"] += 1
            await asyncio.sleep(0.5)
        return False

    def _message(self, number: int) -> str:
        ref = f"{self.config.tag}-u{self.index}-r{number}"
        every = self.config.slow_every
        if every and self.config.slow_seconds and number % every == every - 1:
            return f"/slow {self.config.slow_seconds} {ref}"
        template = MESSAGES[(self.index + number) % len(MESSAGES)]
        return template.format(ref=ref, a=number % 50 + 2, b=self.index % 9 + 3)

    async def work(self) -> None:
        """Create runs and poll each until terminal while the load lasts."""
        if not await self.login(self.load.deadline):
            return
        number = 0
        while self.load.accepting():
            session_key = f"{self.config.tag}-s{number % self.config.sessions_per_user}"
            record = await self._create(session_key, self._message(number))
            number += 1
            if record is None:
                await asyncio.sleep(0.5)
                continue
            if record.id is not None and not record.terminal:
                await self._poll(record)
            if record.terminal and record.status == "failed":
                # A person reads the error before sending the next message.
                await asyncio.sleep(FAILED_PAUSE_SECONDS)

    async def _create(self, session_key: str, text: str) -> RunRecord | None:
        path = "/agents/runs/"
        started = time.perf_counter()
        response = await self._request(
            "POST",
            path,
            json={"session_key": session_key, "input": text},
            headers=self._csrf_headers(path),
        )
        if response is None:
            # The connection broke: the run may exist; the database audit accounts for it.
            self.stats.runs.append(RunRecord(None, self.username, session_key, text, "no response"))
            return None
        self.stats.create_latencies.append(time.perf_counter() - started)
        if response.status_code != 201:
            self.stats.errors[str(response.status_code)] += 1
            if response.status_code == 401:
                await self.login(self.load.drain_deadline)
            elif response.status_code == 429:
                retry = float(response.headers.get("retry-after", "1"))
                await asyncio.sleep(min(retry, max(0.0, self.load.deadline - time.monotonic())))
            return None
        self.stats.created += 1
        body = response.json()
        record = RunRecord(body["id"], self.username, session_key, text, 201, started=started)
        record.status = body["status"]
        self.stats.runs.append(record)
        if body.get("is_terminal"):
            self._terminal(record, body, started)
        return record

    async def _poll(self, record: RunRecord) -> None:
        started = record.started
        path = f"/agents/runs/{record.id}/"
        while time.monotonic() < self.load.drain_deadline:
            await asyncio.sleep(self.config.poll_interval)
            sent = time.perf_counter()
            response = await self._request("GET", path)
            if response is None:
                continue
            self.stats.poll_latencies.append(time.perf_counter() - sent)
            if response.status_code == 401:
                self.stats.errors["401"] += 1
                await self.login(self.load.drain_deadline)
                continue
            if response.status_code != 200:
                self.stats.errors[str(response.status_code)] += 1
                continue
            body = response.json()
            record.status = body["status"]
            if body.get("is_terminal"):
                self._terminal(record, body, started)
                return

    def _terminal(self, record: RunRecord, body: dict, started: float) -> None:
        record.status = body["status"]
        record.finished_at = body.get("finished_at")
        record.error = (body.get("error") or "")[:200]
        record.seconds_to_terminal = time.perf_counter() - started
        record.terminal = True
        self.stats.terminal[body["status"]] += 1
        self.stats.run_latencies.append(record.seconds_to_terminal)


class LoadTest:
    """Runs the users concurrently on one event loop; `stats` can be watched from other threads."""

    def __init__(self, config: LoadConfig) -> None:
        self.config = config
        self.stats = Stats()
        self.started = 0.0
        self.deadline = math.inf
        self.drain_deadline = math.inf
        self.finished = 0.0

    def stop_creating(self, after: float = 0.0) -> None:
        """End the load window `after` seconds from now; open runs are still polled (drain)."""
        self.deadline = min(self.deadline, time.monotonic() + after)

    def accepting(self) -> bool:
        return time.monotonic() < self.deadline and self.stats.requests < self.config.max_requests

    async def run(self) -> dict:
        """Run the load to its end and return the report."""
        self.started = time.monotonic()
        self.deadline = self.started + self.config.seconds
        self.drain_deadline = self.deadline + self.config.drain_seconds
        users = [
            LoadUser(self, index, username, password)
            for index, (username, password) in enumerate(self.config.users)
        ]
        try:
            await asyncio.gather(*(user.work() for user in users))
        finally:
            await asyncio.gather(*(user.client.aclose() for user in users))
        self.finished = time.monotonic()
        return self.report()

    def report(self) -> dict:
        """Figures, and every run as its client last saw it (`terminal` once it saw it end)."""
        stats = self.stats
        elapsed = (self.finished or time.monotonic()) - self.started
        runs = [asdict(run) for run in stats.runs]
        for run in runs:
            del run["started"]
        unfinished = [run for run in stats.runs if run.id and not run.terminal]

        def summary(values: list[float]) -> dict:
            return {
                "count": len(values),
                **{f"p{pct}_ms": _ms(percentile(values, pct)) for pct in (50, 95, 99)},
                "max_ms": _ms(max(values) if values else None),
            }

        return {
            "config": {key: value for key, value in asdict(self.config).items() if key != "users"}
            | {"users": len(self.config.users)},
            "elapsed_seconds": round(elapsed, 2),
            "requests": stats.requests,
            "logins": stats.logins,
            "runs_created": stats.created,
            "runs_terminal": dict(stats.terminal),
            "runs_unfinished_seen": len(unfinished),
            "create_requests_without_response": sum(
                1 for run in stats.runs if run.create_status == "no response"
            ),
            "runs_per_second": round(stats.terminal["completed"] / elapsed, 2) if elapsed else 0,
            "errors": dict(stats.errors),
            "server_errors_5xx": sum(
                count for key, count in stats.errors.items() if key[:1] == "5" and key.isdigit()
            ),
            "poll_latency": summary(stats.poll_latencies),
            "create_latency": summary(stats.create_latencies),
            "run_latency": summary(stats.run_latencies),
            "runs": runs,
        }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def create_users(
    project: Path,
    usernames: list[str],
    password: str,
    *,
    python: str = sys.executable,
    env: dict[str, str] | None = None,
) -> None:
    """Create (or reset) these users in `project` with one `manage.py shell` call."""
    payload = json.dumps([usernames, password])
    # One hash for all: hashing is deliberately slow, and the users only differ by name.
    script = (
        "import json\n"
        "from django.contrib.auth import get_user_model\n"
        "from django.contrib.auth.hashers import make_password\n"
        f"names, password = json.loads({payload!r})\n"
        "hashed, users = make_password(password), get_user_model().objects\n"
        "for name in names:\n"
        "    users.update_or_create(username=name, defaults={'password': hashed})\n"
    )
    subprocess.run(
        [python, "manage.py", "shell", "--no-imports", "-c", script],
        cwd=project,
        env=env,
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )


def print_summary(report: dict, out=sys.stdout) -> None:
    """A few lines a person reads after a load run."""
    poll, run = report["poll_latency"], report["run_latency"]
    lines = [
        f"load: {report['config']['users']} users, {report['elapsed_seconds']}s,"
        f" {report['requests']} requests",
        f"runs: {report['runs_created']} created, terminal {report['runs_terminal']},"
        f" {report['runs_per_second']} completed/s",
        f"poll latency ms: p50 {poll['p50_ms']} p95 {poll['p95_ms']} p99 {poll['p99_ms']}",
        f"run latency ms (create to terminal seen): p50 {run['p50_ms']} p95 {run['p95_ms']}"
        f" p99 {run['p99_ms']}",
        f"errors: {report['errors'] or 'none'}",
    ]
    print("\n".join(lines), file=out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:8000")
    parser.add_argument("--users", type=int, default=10)
    parser.add_argument("--username-prefix", default="load-user-")
    parser.add_argument("--password", default="load-test-password-42")
    parser.add_argument(
        "--create-users-in", type=Path, help="project dir: create the users there first"
    )
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--max-requests", type=int, default=100_000)
    parser.add_argument("--sessions-per-user", type=int, default=2)
    parser.add_argument("--poll-interval", type=float, default=0.25)
    parser.add_argument("--drain-seconds", type=float, default=60.0)
    parser.add_argument("--no-forwarded-https", action="store_true", help="plain HTTP settings")
    parser.add_argument("--slow-every", type=int, default=0)
    parser.add_argument("--slow-seconds", type=int, default=0)
    parser.add_argument("--report", type=Path, help="write the JSON report here")
    args = parser.parse_args(argv)

    names = [f"{args.username_prefix}{n}" for n in range(args.users)]
    config = LoadConfig(
        base_url=args.base_url,
        users=[(name, args.password) for name in names],
        seconds=args.seconds,
        max_requests=args.max_requests,
        sessions_per_user=args.sessions_per_user,
        poll_interval=args.poll_interval,
        drain_seconds=args.drain_seconds,
        forwarded_https=not args.no_forwarded_https,
        slow_every=args.slow_every,
        slow_seconds=args.slow_seconds,
        tag=f"load{int(time.time())}",
    )
    if args.create_users_in:
        create_users(args.create_users_in, names, args.password)
    report = asyncio.run(LoadTest(config).run())
    print_summary(report)
    if args.report:
        args.report.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
