"""Latency as a user sees it: the project served as `make dev` serves it, driven by Chromium.

    DATABASE_URL=... REDIS_URL=... python -m benchmarks.run_latency [--quick]

Run in a baked project (``python -m benchmarks --only latency`` bakes one per combination:
SQLite + the database backend, PostgreSQL + RQ), with throwaway servers: it migrates the
database ``DATABASE_URL`` names (``make dev`` does) and uses Redis database 15 besides the
project's. The web and worker processes are started as ``make dev`` starts them -- ``uvicorn
config.asgi:application --lifespan off`` and ``manage.py agentic_django_worker`` side by side,
with the project's own settings and ``.env`` -- only without ``--reload``
(``--reload-cold-starts`` measures with it) and with no rate limit
(``AGENTIC_DJANGO_RATE_LIMIT=``: the benchmark sends more than 20 messages a minute).

With the demo model:

- cold start: from both processes printing their ready line to the first demo reply on screen
  (page load, Enter, reply), with a new process pair each time (``--cold-starts``);
- Enter -> reply: messages in one conversation, ``THINK_SECONDS`` apart (a user reads the
  reply first), from the Enter keydown to the complete reply visible and to the run shown
  finished, with each run's server-side timeline (created, dispatched, started, finished);
- worker pickup: runs created one at a time for an idle worker, ``dispatched_at`` ->
  ``started_at`` (both the database's clock).

With a streaming model, the processes restarted with ``OPENAI_BASE_URL`` pointing at the
project's fake OpenAI-compatible server (``tests/fakes/openai_server.py``, Responses API, no
key), which thinks ``FIRST_DELTA_DELAY`` seconds and then streams a reply in pieces:

- delta latency: from the server writing a piece to its text on screen in the run's live
  element, from both clocks of this machine (``time.time()`` here, ``Date.now()`` in the page);
- idle cost, after the last reply: CPU seconds a minute (``/proc``: every thread of each
  process group) of the idle worker and web process, and of the backend's stock worker
  (``db_worker`` polling every second, or a plain ``rqworker``) idling in the same window,
  started with the processes on a queue (or Redis database) no task is sent to.

"On screen" is the first animation frame after the DOM change (a ``MutationObserver`` records
the change, ``requestAnimationFrame`` the frame). Chromium is ``$CHROMIUM_PATH`` or
``/usr/bin/chromium``. Times are wall-clock and absolute: note the load average (reported).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from benchmarks import common
from scripts.servers import free_port

# Targets of issue 11 (p50 unless named otherwise).
COLD_START_LIMIT_MS = 2000.0
REPLY_LIMIT_MS = 300.0
FIRST_DELTA_LIMIT_MS = 150.0
PICKUP_LIMIT_MS = 100.0
# "No measurable idle cost": an idle worker uses at most 0.1 CPU seconds a minute (1/600 of a
# core) more than the backend's stock worker idling beside it.
IDLE_LIMIT_CPU_S_PER_MIN = 0.1

READY = {"web": r"Uvicorn running on", "worker": r"Starting worker|\*\*\* Listening on"}
# With --reload, uvicorn prints its address before its child process has even imported the
# application (connections are refused until the child listens); the child says it started.
RELOADED = r"Started server process"
# `make web`'s --reload flags (the Makefile's WEB variable).
RELOAD_FLAGS = [
    "--reload",
    *("--reload-dir", "agentic_django", "--reload-dir", "chat"),
    *("--reload-dir", "config", "--reload-dir", "templates"),
]
STOCK_WORKERS = {
    # With DEBUG on, db_worker restarts on code changes by default: its file watcher is not
    # the polling this compares with.
    "database": ["db_worker", "--no-reload"],
    "rq": [
        *("rqworker", "default", "--worker-class", "rq.worker.Worker"),
        *("--job-class", "django_tasks_rq.Job"),
    ],
}
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run"]
# The streaming model: thinks before its first token, then streams pieces a little apart (more
# than the worker's 0.1 s write interval, so every piece is written on its own).
FIRST_DELTA_DELAY = 0.3
STREAMED_REPLY = (
    "Streaming means the words arrive one after another, so nobody stares at a blank "
    "screen while a slow model thinks."
)
STREAM_DELTAS = 8
STREAM_DELAY = 0.15
TIMEOUT = 60.0
# A user reads the reply before sending the next message: the worker is idle again by then.
THINK_SECONDS = (0.3, 0.6)

# Installed in every page: the Enter keydowns, and a snapshot of the newest run's visible text
# after every DOM change, with the wall-clock time of the change and of the next frame.
OBSERVER = """
(() => {
  const lat = (window.__lat = { keys: [], snaps: [], loaded: null });
  lat.reset = () => { lat.keys = []; lat.snaps = []; };
  window.addEventListener("load", () => { lat.loaded = Date.now(); });
  document.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && event.target.id === "message") lat.keys.push(Date.now());
  }, true);
  let last = "";
  const look = () => {
    const runs = document.querySelectorAll("#turns .agentic-run");
    const run = runs[runs.length - 1];
    if (!run) return;
    const state = `${run.dataset.runId}|${run.dataset.status}|${run.innerText}`;
    if (state === last) return;
    last = state;
    const snap = { t: Date.now(), painted: null, id: run.dataset.runId,
                   status: run.dataset.status, text: run.innerText };
    lat.snaps.push(snap);
    requestAnimationFrame(() => { snap.painted = Date.now(); });
  };
  new MutationObserver(look).observe(document, {
    subtree: true, childList: true, characterData: true, attributes: true,
  });
})();
"""
# The newest run is finished and shows the message that started it.
FINISHED = """
(marker) => {
  const runs = document.querySelectorAll("#turns .agentic-run");
  const run = runs[runs.length - 1];
  return !!run && run.dataset.terminal === "true" && run.innerText.includes(marker);
}
"""


# --- processes -----------------------------------------------------------------------------


@dataclass
class Line:
    wall: float  # time.time() when this process wrote the line
    text: str


class Process:
    """A child process whose output lines are read (and time-stamped) as they are written."""

    def __init__(self, name: str, argv: list[str], *, env: dict[str, str], log: Path) -> None:
        self.name = name
        self.argv = argv
        self.env = env
        self.log = log
        self.lines: list[Line] = []
        self._changed = threading.Condition()
        self.popen: subprocess.Popen[str] | None = None

    def start(self) -> Process:
        self.popen = subprocess.Popen(  # our interpreter, fixed arguments
            self.argv,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            start_new_session=True,  # its own group: stopped with everything it forked
        )
        threading.Thread(target=self._read, name=f"read-{self.name}", daemon=True).start()
        return self

    def _read(self) -> None:
        assert self.popen is not None and self.popen.stdout is not None
        with self.log.open("a") as log:
            for text in self.popen.stdout:
                line = Line(time.time(), text.rstrip("\n"))
                log.write(text)
                with self._changed:
                    self.lines.append(line)
                    self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def wait_line(self, pattern: str, *, after: int = 0, timeout: float = TIMEOUT) -> Line:
        """The first line from index ``after`` on that matches ``pattern``."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in self.lines[after:]:
                    if regex.search(line.text):
                        return line
                if self.popen is None or self.popen.poll() is not None:
                    raise RuntimeError(f"{self.name} exited:\n{self.tail()}")
                if not self._changed.wait(max(0.0, deadline - time.monotonic())):
                    raise TimeoutError(f"{self.name}: no line like {pattern!r}\n{self.tail()}")

    def cpu_seconds(self) -> float:
        """CPU time of the process and everything it started (its process group)."""
        return group_cpu_seconds(self.pid)

    def tail(self, lines: int = 30) -> str:
        return "\n".join(f"  {line.text}" for line in self.lines[-lines:])

    def stop(self) -> None:
        self.terminate()
        self.wait()

    def terminate(self) -> None:
        """Ask the process (and what it forked) to stop; ``wait`` for it."""
        if self.popen is not None and self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)

    def wait(self) -> None:
        if self.popen is None:
            return
        try:
            self.popen.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait()


def group_cpu_seconds(group: int) -> float:
    """CPU time so far of every thread of every process in process group ``group``: the
    scheduler's nanoseconds (``schedstat``), else the 10 ms ticks of ``stat``."""
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) != group:
                continue
            threads = list(stat.parent.glob("task/*/schedstat"))
            if threads:
                total += sum(int(path.read_text().split()[0]) for path in threads) / 1e9
            else:
                ticks = int(fields[11]) + int(fields[12])
                total += ticks / os.sysconf("SC_CLK_TCK")
    return total


def manage(*args: str) -> list[str]:
    return [sys.executable, "manage.py", *args]


@dataclass
class Stack:
    """The web and worker processes of ``make dev``, started together."""

    web: Process
    worker: Process
    url: str
    started: float  # time.time() when both were started
    reload: bool = False

    def ready(self) -> float:
        """Wait for both ready lines (with --reload: the web child's); the later one's time."""
        web = self.web.wait_line(RELOADED if self.reload else READY["web"])
        return max(web.wall, self.worker.wait_line(READY["worker"]).wall)


@contextlib.contextmanager
def dev_stack(
    env: dict[str, str], *, logdir: Path, label: str, reload: bool = False
) -> Iterator[Stack]:
    port = free_port()
    web_argv = [sys.executable, "-m", "uvicorn", "config.asgi:application"]
    web_argv += ["--host", "127.0.0.1", "--port", str(port), "--lifespan", "off"]
    web_argv += RELOAD_FLAGS if reload else []
    web = Process("web", web_argv, env=env, log=logdir / f"{label}-web.log")
    worker = Process(
        "worker", manage("agentic_django_worker"), env=env, log=logdir / f"{label}-worker.log"
    )
    started = time.time()
    try:
        web.start()
        worker.start()
        yield Stack(web, worker, f"http://127.0.0.1:{port}", started, reload)
    finally:
        for process in (web, worker):
            process.terminate()
        for process in (web, worker):
            process.wait()


# --- `make dev` itself: start, reload, Ctrl-C ---------------------------------------------

# A file the reloader watches (the Makefile's --reload-dir config).
DEV_CHANGED_FILE = Path("config/urls.py")
DEV_LIMITS_MS = {"start_to_answer_ms": 3000.0, "change_to_answer_ms": 2000.0}


def _answer_time(url: str, process: Process) -> float:
    """``time.time()`` when ``url`` first answers 200 (a refused connection is tried again)."""
    import urllib.request

    deadline = time.monotonic() + TIMEOUT
    while True:
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=TIMEOUT) as answer:
            if answer.status == 200:
                return time.time()
        if process.popen is None or process.popen.poll() is not None:
            raise RuntimeError(f"{process.name} exited:\n{process.tail()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} never answered:\n{process.tail()}")
        time.sleep(0.02)


def dev_server(index: int, *, logdir: Path) -> dict[str, Any]:
    """``make dev`` as a developer runs it (migrate, then the web server with --reload and the
    worker; the commands bare, from this interpreter's environment): from its start to the web
    answering, from a code change to the new server process answering, and from Ctrl-C
    (SIGINT to its process group) to every process gone."""
    port = free_port()
    env = {**stack_env(), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    argv = ["make", "--no-print-directory", "dev", "RUN=", f"PORT={port}"]
    make = Process(f"make-dev-{index}", argv, env=env, log=logdir / f"make-dev-{index}.log")
    url = f"http://127.0.0.1:{port}/healthz/"
    started = time.time()
    make.start()
    try:
        answered = _answer_time(url, make)
        seen = len(make.lines)
        changed = time.time()
        os.utime(DEV_CHANGED_FILE)
        noticed = make.wait_line("Reloading", after=seen)
        make.wait_line(RELOADED, after=make.lines.index(noticed))  # the new server process
        reloaded = _answer_time(url, make)
        interrupted = time.time()
        os.killpg(make.pid, signal.SIGINT)
        deadline = time.monotonic() + TIMEOUT
        while group_alive(make.pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        gone = time.time() if not group_alive(make.pid) else None
    finally:
        make.stop()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(make.pid, signal.SIGKILL)  # whatever outlived make
    return {
        "sample": index,
        "start_to_answer_ms": (answered - started) * 1000,
        "change_to_answer_ms": (reloaded - changed) * 1000,
        "noticed_to_answer_ms": (reloaded - noticed.wall) * 1000,
        "ctrl_c_to_gone_ms": (gone - interrupted) * 1000 if gone else None,
    }


def group_alive(group: int) -> bool:
    """Whether a process of the group is alive (zombies aside)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == group and fields[0] != "Z":
                return True
    return False


def dev_server_table(combo: str, samples: list[dict[str, Any]]) -> dict[str, Any]:
    medians = {
        key: statistics.median(sample[key] for sample in samples) if samples else None
        for key in DEV_LIMITS_MS
    }
    return {
        "title": f"{combo}: `make dev` (ms; targets: start -> answering "
        f"{DEV_LIMITS_MS['start_to_answer_ms']:.0f}, change -> answering "
        f"{DEV_LIMITS_MS['change_to_answer_ms']:.0f}; medians {medians})",
        "columns": [
            ("sample", "sample"),
            ("start_to_answer_ms", "start -> answering (migrate included)"),
            ("change_to_answer_ms", "code change -> new process answering"),
            ("noticed_to_answer_ms", "'Reloading' -> answering"),
            ("ctrl_c_to_gone_ms", "Ctrl-C -> every process gone"),
        ],
        "rows": samples,
    }


# --- the browser -------------------------------------------------------------------------


class Browser:
    """Chromium through Playwright's sync API; pages logged in with a prepared session."""

    def __init__(self, playwright: Any) -> None:
        executable = os.environ.get("CHROMIUM_PATH") or "/usr/bin/chromium"
        if not Path(executable).exists():
            raise SystemExit(f"no Chromium at {executable} (set CHROMIUM_PATH)")
        self.browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        self.cookie = ("", "")  # set once the database is there

    def context(self, url: str) -> Any:
        context = self.browser.new_context(base_url=url, viewport={"width": 1280, "height": 860})
        name, value = self.cookie
        context.add_cookies([{"name": name, "value": value, "url": url}])
        context.add_init_script(OBSERVER)
        context.set_default_timeout(TIMEOUT * 1000)
        return context

    def close(self) -> None:
        self.browser.close()


@dataclass
class Message:
    """What one message took, in wall-clock seconds (page and database on this machine)."""

    run_id: str
    enter: float
    text_visible: float | None  # the complete reply's last words on screen
    done_visible: float | None  # the run shown finished (data-status)
    snaps: list[dict[str, Any]] = field(repr=False)
    run: dict[str, Any] = field(repr=False)

    def ms(self, end: float | None, start: float | None = None) -> float | None:
        start = self.enter if start is None else start
        return None if end is None or start is None else (end - start) * 1000


def send(page: Any, text: str, *, marker: str) -> Message:
    """Type ``text`` with Enter and wait until its run finished on screen."""
    page.evaluate("window.__lat.reset()")
    box = page.get_by_role("textbox", name="Message")
    box.fill(text)
    box.press("Enter")
    page.wait_for_function(FINISHED, arg=marker, timeout=TIMEOUT * 1000)
    page.wait_for_timeout(50)  # the last frame's timestamp
    lat = page.evaluate("({keys: window.__lat.keys, snaps: window.__lat.snaps})")
    run_id = lat["snaps"][-1]["id"]
    snaps = [snap for snap in lat["snaps"] if snap["id"] == run_id]
    run = run_row(run_id)
    words = _words(str(run["final_output"] or ""))[-4:]
    text_at = next((_at(s) for s in snaps if _contains(_words(s["text"]), words)), None)
    done_at = next((_at(s) for s in snaps if s["status"] == "completed"), None)
    return Message(run_id, lat["keys"][-1] / 1000, text_at, done_at, snaps, run)


def _at(snap: dict[str, Any]) -> float:
    return (snap["painted"] or snap["t"]) / 1000


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text)


def _contains(words: list[str], part: list[str]) -> bool:
    return bool(part) and any(
        words[i : i + len(part)] == part for i in range(len(words) - len(part) + 1)
    )


def run_row(run_id: str) -> dict[str, Any]:
    from django.db import close_old_connections

    from agentic_django.models import AgentRun

    close_old_connections()
    fields = ("status", "final_output", "created_at", "dispatched_at", "started_at")
    return AgentRun.objects.values(*fields, "finished_at").get(pk=run_id)


def _wall(value: datetime | None) -> float | None:
    return value.timestamp() if value is not None else None


def timeline(message: Message) -> dict[str, float | None]:
    """The run's server-side steps, ms after Enter (same clock: this machine's)."""
    run = message.run
    return {
        f"{name}_ms": message.ms(_wall(run[f"{name}_at"]))
        for name in ("created", "dispatched", "started", "finished")
    }


# --- measurements --------------------------------------------------------------------------


def open_chat(page: Any) -> None:
    """Load a new chat, again while the server refuses connections (as a user would)."""
    from playwright.sync_api import Error

    deadline = time.monotonic() + TIMEOUT
    while True:
        try:
            page.goto("/")
            return
        except Error as error:
            if "ERR_CONNECTION_REFUSED" not in str(error) or time.monotonic() > deadline:
                raise
            page.wait_for_timeout(50)


def first_reply(stack: Stack, page: Any, *, label: str, reload: bool) -> dict[str, Any]:
    """Wait for both ready lines, then load the chat and send one message (a new chat)."""
    ready = stack.ready()
    open_chat(page)
    loaded = page.evaluate("window.__lat.loaded") / 1000
    message = send(page, "Hello! First message.", marker="First message.")
    processes_ready = {
        name: (process.wait_line(READY[name]).wall - stack.started) * 1000
        for name, process in (("web", stack.web), ("worker", stack.worker))
    }
    if reload:
        loaded_app = stack.web.wait_line(RELOADED).wall
        processes_ready["web application loaded"] = (loaded_app - stack.started) * 1000
    address = stack.web.wait_line(READY["web"]).wall
    return {
        "sample": label,
        "reload": reload,
        "start_to_ready_ms": (ready - stack.started) * 1000,
        "address_to_reply_ms": message.ms(message.text_visible, address),
        "processes_ready_ms": processes_ready,
        "ready_to_loaded_ms": (loaded - ready) * 1000,
        "ready_to_enter_ms": (message.enter - ready) * 1000,
        "enter_to_reply_ms": message.ms(message.text_visible),
        "enter_to_done_ms": message.ms(message.done_visible),
        "ready_to_reply_ms": message.ms(message.text_visible, ready),
        "ready_to_done_ms": message.ms(message.done_visible, ready),
        **timeline(message),
    }


def cold_start(
    browser: Browser, env: dict[str, str], *, logdir: Path, label: str, reload: bool
) -> dict[str, Any]:
    """A new process pair: the first reply after they said they are ready."""
    with dev_stack(env, logdir=logdir, label=label, reload=reload) as stack:
        context = browser.context(stack.url)
        try:
            return first_reply(stack, context.new_page(), label=label, reload=reload)
        finally:
            context.close()


def pickups(count: int, *, user: Any) -> list[float]:
    """``dispatched_at`` -> ``started_at`` (ms) of runs created one at a time, each for an idle
    worker: the next is created ``THINK_SECONDS`` after the previous one finished."""
    from django.db import close_old_connections

    from agentic_django.models import AgentRun
    from agentic_django.services import create_run

    samples = []
    for _ in range(count):
        close_old_connections()
        run = create_run(owner=user, session_key=uuid.uuid4().hex, input_payload="Hi")
        deadline = time.monotonic() + TIMEOUT
        while True:
            row = AgentRun.objects.values("status", "dispatched_at", "started_at").get(pk=run.pk)
            if row["status"] in AgentRun.TERMINAL_STATUSES:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"run {run.pk} is still {row['status']}")
            time.sleep(0.01)
        if row["status"] != AgentRun.Status.COMPLETED:
            raise RuntimeError(f"run {run.pk} is {row['status']}")
        samples.append((row["started_at"] - row["dispatched_at"]).total_seconds() * 1000)
        time.sleep(random.uniform(*THINK_SECONDS))
    return samples


def idle_cost(stack: Stack, stock: Process, *, seconds: float, name: str) -> list[dict[str, Any]]:
    """CPU seconds per minute of each idle process, all measured over the same window."""
    time.sleep(min(1.0, seconds))  # the last run's after-work and the stock worker's start
    processes = [
        ("agentic_django_worker", stack.worker),
        (f"stock {STOCK_WORKERS[name][0]}", stock),
        ("web (uvicorn)", stack.web),
    ]
    before = {name: process.cpu_seconds() for name, process in processes}
    start = time.monotonic()
    time.sleep(seconds)
    elapsed = time.monotonic() - start
    rows = []
    for name, process in processes:
        used = process.cpu_seconds() - before[name]
        rows.append(
            {
                "process": name,
                "window_s": elapsed,
                "cpu_s": used,
                "cpu_s_per_min": used / elapsed * 60,
                "core_percent": used / elapsed * 100,
            }
        )
    stock_rate = rows[1]["cpu_s_per_min"]
    rows[0]["above_stock"] = rows[0]["cpu_s_per_min"] - stock_rate
    rows[0]["vs_stock"] = rows[0]["cpu_s_per_min"] / stock_rate if stock_rate else None
    return rows


# --- the streaming model -----------------------------------------------------------------


def fake_openai() -> Any:
    """The project's fake OpenAI server, noting when it writes each text delta."""
    from tests.fakes import openai_server

    class TimedHandler(openai_server._Handler):
        def _stream(self, frames: Any, reply: Any) -> None:
            self.emitted: list[tuple[float, str]] = []
            self.server.fake.emitted.append(self.emitted)
            super()._stream(frames, reply)

        def _write_chunk(self, data: bytes) -> None:
            delta = b'"response.output_text.delta"' in data
            if delta and not self.emitted:
                time.sleep(FIRST_DELTA_DELAY)  # the model thinks before its first token
            super()._write_chunk(data)
            if delta:
                body = json.loads(data.decode().split("data: ", 1)[1])
                self.emitted.append((time.time(), body["delta"]))

    fake = openai_server.FakeOpenAI()
    fake.emitted = []
    fake._server.RequestHandlerClass = TimedHandler
    return fake


def delta_latencies(message: Message, emitted: list[tuple[float, str]]) -> list[float | None]:
    """For each delta: ms from the server writing it to the text so far on screen."""
    result, text = [], ""
    for wall, piece in emitted:
        text += piece
        wanted = " ".join(text.split())
        seen = next((_at(s) for s in message.snaps if wanted in " ".join(s["text"].split())), None)
        result.append(None if seen is None else (seen - wall) * 1000)
    return result


# --- the benchmark -------------------------------------------------------------------------


def stats_row(name: str, values: list[float | None], **extra: Any) -> dict[str, Any]:
    present = sorted(value for value in values if value is not None)
    if not present:
        return {"measure": name, "n": 0, "missing": len(values), **extra}
    return {
        "measure": name,
        "n": len(present),
        "missing": len(values) - len(present),
        "p50_ms": statistics.median(present),
        "p90_ms": common.percentile(present, 90),
        "min_ms": present[0],
        "max_ms": present[-1],
        **extra,
    }


def session_cookie(user: Any) -> tuple[str, str]:
    """A logged-in session of ``user`` (no password needed), as a cookie's name and value."""
    from django.conf import settings
    from django.test import Client

    client = Client()
    client.force_login(user)
    name = settings.SESSION_COOKIE_NAME
    return name, client.cookies[name].value


def stack_env(**extra: str) -> dict[str, str]:
    """The environment of `make dev` in this shell: the project's .env does the rest."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "AGENTIC_DJANGO_RATE_LIMIT": "", **extra}
    # Set by `python -m benchmarks` for the other benchmarks; `make dev` has neither.
    for name in ("DJANGO_SETTINGS_MODULE", "OPENAI_AGENTS_DISABLE_TRACING", "BENCH_BASE_SETTINGS"):
        env.pop(name, None)
    return env


@dataclass
class Results:
    """Everything measured for one project, raw."""

    backend: str
    cold: list[dict[str, Any]] = field(default_factory=list)
    messages: list[Message] = field(default_factory=list)
    pickup: list[float] = field(default_factory=list)
    idle: list[dict[str, Any]] = field(default_factory=list)
    streamed: list[list[float | None]] = field(default_factory=list)
    loads: list[tuple[float, float, float]] = field(default_factory=list)
    phases_s: dict[str, float] = field(default_factory=dict)
    dev_server: list[dict[str, Any]] = field(default_factory=list)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time a phase and note the load average as it starts."""
        self.loads.append(os.getloadavg())
        start = time.monotonic()
        try:
            yield
        finally:
            self.phases_s[name] = time.monotonic() - start


def demo_phase(browser: Browser, args: argparse.Namespace, results: Results, logdir: Path):
    """With the demo model: cold starts, then (the last cold start's processes staying up)
    messages in the browser and pickups."""
    from agentic_django.models import AgentRun

    env = stack_env()
    with results.phase("cold starts"):
        for index in range(args.reload_cold_starts):
            label = f"reload-{index}"
            results.cold.append(cold_start(browser, env, logdir=logdir, label=label, reload=True))
        for index in range(args.cold_starts - 1):
            label = f"cold-{index}"
            results.cold.append(cold_start(browser, env, logdir=logdir, label=label, reload=False))
    with dev_stack(env, logdir=logdir, label="demo") as stack:
        context = browser.context(stack.url)
        page = context.new_page()
        with results.phase("demo messages"):
            results.cold.append(first_reply(stack, page, label="demo", reload=False))
            for index in range(args.messages):
                page.wait_for_timeout(random.uniform(*THINK_SECONDS) * 1000)
                marker = f"Latency check {index}."
                message = send(page, f"Hello! {marker}", marker=marker)
                if message.run["status"] != AgentRun.Status.COMPLETED:
                    raise RuntimeError(f"run {message.run_id}: {message.run}")
                results.messages.append(message)
        context.close()
        with results.phase("pickups"):
            results.pickup = pickups(args.pickups, user=common.bench_user("latency"))


def stock_worker(backend: str, env: dict[str, str], *, logdir: Path) -> Process:
    """The backend's stock worker, waiting where no task ever comes: a queue of its own
    (database) or another Redis database (RQ), so it cannot take the benchmark's tasks."""
    argv = list(STOCK_WORKERS[backend])
    if backend == "database":
        argv += ["--queue-name", "latency-idle"]
    else:
        url = env.get("REDIS_URL", "redis://localhost:6379/0")
        env = {**env, "REDIS_URL": url.rsplit("/", 1)[0] + "/15"}
    return Process("stock", manage(*argv), env=env, log=logdir / "stock-worker.log")


def streaming_phase(browser: Browser, args: argparse.Namespace, results: Results, logdir: Path):
    """With a streaming model (the fake server): ``args.streams`` replies, one at a time. The
    stock worker starts with these processes; once the replies are in, the idle window."""
    from tests.fakes.openai_server import Text

    reply = Text(STREAMED_REPLY, deltas=STREAM_DELTAS, delay=STREAM_DELAY)
    with fake_openai() as fake:
        env = stack_env(
            OPENAI_BASE_URL=fake.url,
            OPENAI_API_MODE="responses",
            OPENAI_MODEL="fake-model",
            OPENAI_MAX_RETRIES="0",
        )
        env.pop("OPENAI_API_KEY", None)
        stock = stock_worker(results.backend, env, logdir=logdir)
        with dev_stack(env, logdir=logdir, label="stream") as stack:
            try:
                stock.start()
                context = browser.context(stack.url)
                page = context.new_page()
                with results.phase("streaming"):
                    stack.ready()
                    stock.wait_line(READY["worker"])
                    open_chat(page)
                    for index in range(args.streams):
                        page.wait_for_timeout(random.uniform(*THINK_SECONDS) * 1000)
                        fake.reply(reply)
                        marker = f"Stream check {index}."
                        text = f"Tell me about streaming. {marker}"
                        message = send(page, text, marker=marker)
                        if message.run["status"] != "completed":
                            raise RuntimeError(f"streamed run {message.run_id}: {message.run}")
                        results.streamed.append(delta_latencies(message, fake.emitted[-1]))
                context.close()  # nothing left to poll or stream
                with results.phase("idle"):
                    results.idle = idle_cost(
                        stack, stock, seconds=args.idle_seconds, name=results.backend
                    )
            finally:
                stock.stop()


def measure(args: argparse.Namespace, *, migrating: subprocess.Popen[bytes]) -> dict[str, Any]:
    """Launch Chromium while the database migrates, then measure; return the report."""
    from playwright.sync_api import sync_playwright

    logdir = Path(tempfile.mkdtemp(prefix="agentic-latency-"))
    try:
        with sync_playwright() as playwright:
            browser = Browser(playwright)
            try:
                _, errors = migrating.communicate(timeout=300)
                if migrating.returncode:
                    raise RuntimeError(f"migrate failed:\n{errors.decode(errors='replace')}")
                results = measure_in(browser, args, logdir=logdir)
            finally:
                browser.close()
    except Exception:
        for log in sorted(logdir.glob("*.log")):
            sys.stderr.write(f"--- {log.name}\n{log.read_text(errors='replace')[-3000:]}\n")
        raise
    finally:
        shutil.rmtree(logdir, ignore_errors=True)
    return report(results, args)


def measure_in(browser: Browser, args: argparse.Namespace, *, logdir: Path) -> Results:
    import django

    django.setup()
    from django.conf import settings

    backend = "rq" if "RQBackend" in settings.TASKS["default"]["BACKEND"] else "database"
    results = Results(backend)
    browser.cookie = session_cookie(common.bench_user("latency"))
    with results.phase("make dev"):
        results.dev_server = [dev_server(index, logdir=logdir) for index in range(args.dev_starts)]
    demo_phase(browser, args, results, logdir)
    streaming_phase(browser, args, results, logdir)
    results.loads.append(os.getloadavg())
    return results


def report(results: Results, args: argparse.Namespace) -> dict[str, Any]:
    from django.db import connection

    database = "PostgreSQL" if connection.vendor == "postgresql" else "SQLite"
    combo = f"{database} + {results.backend}"
    messages, idle, loads = results.messages, results.idle, results.loads
    plain = [item for item in results.cold if not item["reload"]]
    reply = [m.ms(m.text_visible) for m in messages]
    done = [m.ms(m.done_visible) for m in messages]
    lines = [timeline(m) for m in messages]
    first_deltas = [latencies[0] for latencies in results.streamed]
    all_deltas = [value for latencies in results.streamed for value in latencies]
    steady = [
        stats_row("worker pickup: dispatched_at -> started_at", results.pickup),
        stats_row("Enter -> complete reply on screen", reply),
        stats_row("Enter -> run shown finished", done),
        *(
            stats_row(f"  Enter -> run {step} (server)", [line[f"{step}_ms"] for line in lines])
            for step in ("created", "dispatched", "started", "finished")
        ),
        stats_row("first delta: model wrote it -> on screen", first_deltas),
        stats_row("every delta: model wrote it -> on screen", all_deltas),
        stats_row("first delta of the processes' first streamed reply", results.streamed[0][:1]),
    ]
    cold_rows = [
        {
            key: item.get(key)
            for key in (
                "sample",
                "start_to_ready_ms",
                "ready_to_loaded_ms",
                "ready_to_enter_ms",
                "enter_to_reply_ms",
                "ready_to_reply_ms",
                "ready_to_done_ms",
                "address_to_reply_ms",
            )
        }
        for item in results.cold
    ]
    cold_p50 = statistics.median(item["ready_to_reply_ms"] for item in plain)
    p50 = {row["measure"]: row.get("p50_ms") for row in steady}
    in_ms = [
        ("ready -> first reply on screen (median of cold starts)", cold_p50, COLD_START_LIMIT_MS),
        (
            "Enter -> complete demo reply on screen (p50)",
            p50["Enter -> complete reply on screen"],
            REPLY_LIMIT_MS,
        ),
        (
            "first delta on screen after the model wrote it (p50)",
            p50["first delta: model wrote it -> on screen"],
            FIRST_DELTA_LIMIT_MS,
        ),
        (
            "idle worker picks up a new run (median)",
            p50["worker pickup: dispatched_at -> started_at"],
            PICKUP_LIMIT_MS,
        ),
    ]
    targets = [
        *(
            common.target(name, value=value, limit=limit, unit=" ms")
            for name, value, limit in in_ms
        ),
        common.target(
            "idle worker's CPU above the stock worker's (s per minute)",
            value=idle[0]["above_stock"],
            limit=IDLE_LIMIT_CPU_S_PER_MIN,
            unit=" s",
        ),
    ]
    load_text = "; ".join(f"{a:.2f} {b:.2f} {c:.2f}" for a, b, c in loads)
    ms = " ms"
    return {
        "title": f"Latency, {combo}",
        "benchmark": "latency",
        "combo": {"database": connection.vendor, "backend": results.backend},
        "load_averages": loads,
        "phases_s": results.phases_s,
        "tables": [
            {
                "title": f"{combo}: cold start (a new process pair each; ms from their start or "
                "from the later ready line)",
                "columns": [
                    ("sample", "sample"),
                    ("start_to_ready_ms", "start -> ready"),
                    ("ready_to_loaded_ms", "ready -> page loaded"),
                    ("ready_to_enter_ms", "ready -> Enter"),
                    ("enter_to_reply_ms", "Enter -> reply"),
                    ("ready_to_reply_ms", "**ready -> reply on screen**"),
                    ("ready_to_done_ms", "ready -> run shown finished"),
                    ("address_to_reply_ms", "'Uvicorn running on' -> reply"),
                ],
                "rows": cold_rows,
            },
            {
                "title": f"{combo}: warm (ms)",
                "columns": [
                    ("measure", "measure"),
                    ("n", "n"),
                    ("p50_ms", "p50"),
                    ("p90_ms", "p90"),
                    ("min_ms", "min"),
                    ("max_ms", "max"),
                ],
                "rows": steady,
            },
            dev_server_table(combo, results.dev_server),
            {
                "title": f"{combo}: idle processes, same {idle[0]['window_s']:.0f} s window",
                "columns": [
                    ("process", "process"),
                    ("cpu_s_per_min", "CPU s/min"),
                    ("core_percent", "% of a core"),
                    ("above_stock", "above the stock worker"),
                ],
                "rows": idle,
            },
        ],
        "targets": targets,
        "notes": [
            f"load averages (1, 5, 15 min) as each phase started ({', '.join(results.phases_s)}) "
            f"and at the end: {load_text}",
            "phases took "
            + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in results.phases_s.items()),
            "processes as `make dev` starts them, without --reload"
            + (" (reload rows: with it)" if args.reload_cold_starts else "")
            + "; AGENTIC_DJANGO_RATE_LIMIT unset",
            f"streaming model: {STREAM_DELTAS} pieces {STREAM_DELAY * 1000:.0f}{ms} apart, the "
            f"first {FIRST_DELTA_DELAY * 1000:.0f}{ms} after the request",
        ],
        "samples": {
            "cold": results.cold,
            "messages": [
                {"run_id": m.run_id, "reply_ms": m.ms(m.text_visible), **timeline(m)}
                for m in messages
            ],
            "pickup_ms": results.pickup,
            "streamed_ms": results.streamed,
        },
    }


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks that it runs")
    parser.add_argument("--cold-starts", type=int, default=3, help="process pairs started")
    parser.add_argument("--reload-cold-starts", type=int, default=1, help="... with --reload")
    parser.add_argument("--messages", type=int, default=20, help="demo messages, one at a time")
    parser.add_argument("--pickups", type=int, default=30, help="runs for an idle worker")
    parser.add_argument("--streams", type=int, default=10, help="streamed replies")
    parser.add_argument("--idle-seconds", type=float, default=60.0, help="idle window")
    parser.add_argument("--dev-starts", type=int, default=3, help="`make dev` starts (reloads)")
    parser.add_argument("--json", dest="json_path", help="also write the report as JSON here")
    args = parser.parse_args(argv)
    if args.quick:
        args.cold_starts, args.reload_cold_starts, args.messages = 1, 0, 2
        args.pickups, args.streams, args.idle_seconds = 2, 1, 1.0
        args.dev_starts = 1
    args.cold_starts, args.streams = max(1, args.cold_starts), max(1, args.streams)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Migrate, measure, print (and optionally save) the report."""
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    os.environ["DJANGO_SETTINGS_MODULE"] = "config.settings"
    # Playwright's sync API keeps an event loop in this thread; the ORM calls here are sync.
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
    migrating = subprocess.Popen(  # `make dev` migrates first
        manage("migrate", "--no-input"),
        env=stack_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    report_ = measure(args, migrating=migrating)
    report_["machine"] = common.machine()
    return common.emit(report_, argv=["benchmarks.run_latency", *argv], json_path=args.json_path)


if __name__ == "__main__":
    main()
