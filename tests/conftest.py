from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest

from scripts.bake import Combo, bake
from scripts.servers import Server, start_postgres, start_redis

TASK_BACKENDS = ("rq", "database", "immediate")
DATABASES = ("postgres", "sqlite")
CIS = ("github", "none")

COMBOS = [Combo(*values) for values in itertools.product(TASK_BACKENDS, DATABASES, CIS)]
DEFAULT = Combo("rq", "postgres", "github")


def combo_params(combos: list[Combo] = COMBOS) -> list:
    """Parametrize over combinations, keeping each one on a single xdist worker (baked once)."""
    return [pytest.param(c, id=c.id, marks=pytest.mark.xdist_group(c.id)) for c in combos]


@pytest.fixture(scope="session")
def baked(tmp_path_factory):
    """Bake each combination once per test process; returns a function Combo -> project dir."""
    projects: dict[Combo, Path] = {}

    def get(combo: Combo) -> Path:
        if combo not in projects:
            projects[combo] = bake(tmp_path_factory.mktemp(combo.id), **combo.context)
        return projects[combo]

    return get


@pytest.fixture(scope="session")
def postgres() -> Server:
    server = start_postgres()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_server() -> Server:
    server = start_redis()
    yield server
    server.stop()


def run(argv: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 900):
    """Run a command in a baked project with this environment's Python; fail with its output."""
    full_env = {**os.environ, "OPENAI_AGENTS_DISABLE_TRACING": "1", **(env or {})}
    full_env.pop("DJANGO_SETTINGS_MODULE", None)
    result = subprocess.run(
        argv, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout
    )
    if result.returncode != 0:
        pytest.fail(
            f"{' '.join(argv)} exited {result.returncode} in {cwd}\n"
            f"--- stdout ---\n{result.stdout[-20000:]}\n--- stderr ---\n{result.stderr[-8000:]}",
            pytrace=False,
        )
    return result


def manage(project: Path, *args: str, env: dict[str, str] | None = None):
    return run([sys.executable, "manage.py", *args], cwd=project, env=env)
