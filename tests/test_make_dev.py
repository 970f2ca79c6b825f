"""`make dev` in a baked project stops on Ctrl-C: SIGINT to its process group, as a terminal
sends it, stops the web server (its reloader and server process), the worker, the shell and
make within seconds, leaves no process behind and frees the port for the next `make dev`; the
output shows no crash (a segfault, a recursion in a signal handler) and no traceback."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from scripts.bake import Combo
from scripts.servers import free_port
from tests.conftest import combo_params

# Where the sample chat runs with a worker and no server to start (make demo's options).
DEV_COMBOS = [Combo("database", "sqlite", "none")]
STARTUP_SECONDS = 180.0  # migrate, then both servers, on a loaded machine
STOP_SECONDS = 10.0
TROUBLE = ("Segmentation fault", "RecursionError", "Traceback", "was never awaited")


def session_processes(session: int) -> list[str]:
    """The live processes (not zombies) of a session: pid and command line."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            # After the command name: state, ppid, pgrp, session, ...
            state, _, _, sid = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:4]
            if int(sid) == session and state != "Z":
                command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                found.append(f"{entry.name} {command}")
    return found


def port_is_free(port: int) -> bool:
    """Whether a server can listen on the port again (binding as uvicorn does)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def answers(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz/", timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.mark.parametrize("combo", combo_params(DEV_COMBOS))
def test_ctrl_c_stops_make_dev_and_frees_its_port(baked, combo: Combo, tmp_path):
    project = baked(combo)
    port = free_port()
    env = {
        **os.environ,
        # RUN= below: the commands run bare, from this environment's virtualenv.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}",
        "OPENAI_AGENTS_DISABLE_TRACING": "1",
    }
    env.pop("DJANGO_SETTINGS_MODULE", None)
    log = tmp_path / "make-dev.log"
    argv = ["make", "--no-print-directory", "dev", "RUN=", f"PORT={port}"]
    with log.open("wb") as output:
        make = subprocess.Popen(
            argv,
            cwd=project,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + STARTUP_SECONDS
        # Both servers up: the web answers, the worker has preloaded (and handles signals).
        while not (answers(port) and "Preloaded the Agents SDK" in log.read_text()):
            assert make.poll() is None, f"make dev exited {make.returncode}:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"make dev never came up:\n{log.read_text()}"
            time.sleep(0.2)

        os.killpg(make.pid, signal.SIGINT)
        deadline = time.monotonic() + STOP_SECONDS
        while True:
            make.poll()  # reaps make once it exits
            left = session_processes(make.pid)
            if not left and port_is_free(port):
                break
            assert time.monotonic() < deadline, (
                f"{STOP_SECONDS}s after Ctrl-C, still running: {left}; port free: "
                f"{port_is_free(port)}\n{log.read_text()}"
            )
            time.sleep(0.1)
    finally:
        for process in session_processes(make.pid):
            with contextlib.suppress(OSError):
                os.kill(int(process.split()[0]), signal.SIGKILL)
        make.wait()
    output = log.read_text()
    for trouble in TROUBLE:
        assert trouble not in output, output
