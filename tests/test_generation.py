"""Bake every option combination and check each project the way its own user and CI would."""

from __future__ import annotations

import fnmatch
import json
import re
import secrets
import sys
import tomllib
from pathlib import Path

import pytest
from cookiecutter.exceptions import FailedHookException

from scripts.bake import TEMPLATE
from tests.conftest import COMBOS, DEFAULT, Combo, bake, combo_params, manage, run

# These run the whole generated suite (browser tests, fuzzing); the others skip those, which
# do not depend on the task backend or CI option.
FULL_SUITE_COMBOS = {DEFAULT, Combo("database", "sqlite", "none")}
# The generated suite runs once per task backend and database: the CI option only adds a
# workflow file (checked in test_compose_ci.py), so its other value would run the same suite.
SUITE_COMBOS = [
    combo
    for combo in COMBOS
    if combo == DEFAULT
    or (combo.ci == "none" and (combo.task_backend, combo.database) != ("rq", "postgres"))
]
# The top of a generated project: what its owner works with, nothing that measures the template.
TOP_LEVEL = {
    ".cruft.json", ".dockerignore", ".env", ".env.example", ".gitignore", "Dockerfile",
    "Makefile", "README.md", "agentic_django", "chat", "compose.yaml", "config", "docker",
    "docs", "manage.py", "pyproject.toml", "scripts", "templates", "tests",
}  # fmt: skip
# What running the project's commands and tests leaves behind (all git-ignored).
RUNTIME_OUTPUT = {"__pycache__", ".pytest_cache", ".ruff_cache", "test-artifacts", "staticfiles"}
TEXT_SUFFIXES = {".py", ".toml", ".yaml", ".yml", ".md", ".txt", ".cfg", ".ini", ".example", ""}


def service_env(combo: Combo, request) -> dict[str, str]:
    """Point a baked project at real servers for the options that need them."""
    env = {}
    if combo.database == "postgres":
        env["DATABASE_URL"] = request.getfixturevalue("postgres").url
    if combo.task_backend == "rq":
        env["REDIS_URL"] = request.getfixturevalue("redis_server").url
    return env


def project_files(project: Path):
    for path in sorted(project.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts:
            yield path


@pytest.mark.parametrize("combo", combo_params())
def test_bakes_with_the_files_the_options_need(baked, combo: Combo):
    project = baked(combo)
    assert project.name == "agentic_app"
    for required in ("manage.py", "pyproject.toml", "README.md", "Makefile", "config/settings.py"):
        assert (project / required).is_file(), required
    assert (project / ".github/workflows/ci.yml").exists() == (combo.ci == "github")

    env_file = (project / ".env").read_text()
    secret = re.search(r"^SECRET_KEY=(.+)$", env_file, re.MULTILINE)
    assert secret and len(secret.group(1)) >= 50
    assert ("REDIS_URL=" in env_file) == (combo.task_backend == "rq")
    assert ".env" in (project / ".gitignore").read_text().split()

    settings = (project / "config/settings.py").read_text()
    backend = {
        "rq": "django_tasks_rq.RQBackend",
        "database": "django_tasks_db.DatabaseBackend",
        "immediate": "django.tasks.backends.immediate.ImmediateBackend",
    }[combo.task_backend]
    assert f'"BACKEND": "{backend}"' in settings


@pytest.mark.parametrize("combo", combo_params())
def test_the_tree_holds_only_what_its_owner_keeps(baked, combo: Combo):
    project = baked(combo)
    top = {path.name for path in project.iterdir()} - RUNTIME_OUTPUT
    assert {name for name in top if not name.startswith("db.sqlite3")} == TOP_LEVEL | (
        {".github"} if combo.ci == "github" else set()
    )
    # The promises, and the README's screenshot of the run inspector.
    assert sorted(path.name for path in (project / "docs").iterdir()) == [
        "guarantees.md",
        "inspector.png",
    ]
    measuring = [path for path in project.rglob("*bench*") if "__pycache__" not in path.parts]
    assert measuring == [], "benchmarks belong to the template repository"


def test_each_bake_gets_its_own_secret(tmp_path):
    first = bake(tmp_path / "one") / ".env"
    second = bake(tmp_path / "two") / ".env"
    assert first.read_text().splitlines()[1] != second.read_text().splitlines()[1]


def copied_verbatim(relative: Path) -> bool:
    """Whether cookiecutter copies this file without rendering (see _copy_without_render)."""
    patterns = json.loads((TEMPLATE / "cookiecutter.json").read_text())["_copy_without_render"]
    candidates = [relative.as_posix(), *(p.as_posix() for p in relative.parents)]
    return any(fnmatch.fnmatch(c, pattern) for c in candidates for pattern in patterns)


@pytest.mark.parametrize("combo", combo_params())
def test_no_template_syntax_left(baked, combo: Combo):
    project = baked(combo)
    leftovers = []
    for path in project_files(project):
        if path.suffix not in TEXT_SUFFIXES and path.name not in {"Makefile", "Dockerfile"}:
            continue
        text = path.read_text()
        rendered = not copied_verbatim(path.relative_to(project))
        if "{{ cookiecutter" in text or (rendered and re.search(r"{%|%}|{#|cookiecutter", text)):
            leftovers.append(str(path))
    assert leftovers == []


@pytest.mark.parametrize("combo", combo_params())
def test_pins_match_the_template_test_environment(baked, combo: Combo):
    """The template is tested with requirements.txt: it must pin what the projects pin."""
    pyproject = tomllib.loads((baked(combo) / "pyproject.toml").read_text())
    pins = pyproject["project"]["dependencies"] + pyproject["dependency-groups"]["dev"]
    ours = {
        line.strip()
        for line in (TEMPLATE / "requirements.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert all("==" in pin for pin in pins)
    assert sorted(set(pins) - ours) == []


@pytest.mark.parametrize("combo", combo_params())
def test_lint_clean_with_its_own_config(baked, combo: Combo):
    project = baked(combo)
    run([sys.executable, "-m", "ruff", "check", "."], cwd=project)
    run([sys.executable, "-m", "ruff", "format", "--check", "."], cwd=project)


@pytest.mark.parametrize("combo", combo_params())
def test_django_checks_and_migrations(baked, combo: Combo, request):
    project = baked(combo)
    env = service_env(combo, request)
    manage(project, "check", "--fail-level", "WARNING", env=env)
    manage(project, "makemigrations", "--check", "--dry-run", env=env)


@pytest.mark.parametrize("combo", combo_params())
def test_deploy_checks_clean_in_production(baked, combo: Combo, request):
    env = {
        **service_env(combo, request),
        "DEBUG": "False",
        "SECRET_KEY": secrets.token_urlsafe(50),
        "ALLOWED_HOSTS": "agents.example.com",
    }
    manage(baked(combo), "check", "--deploy", "--fail-level", "WARNING", env=env)


@pytest.mark.xdist_group("grouping-check")
def test_xdist_keeps_a_group_on_one_worker(request):
    """Each combination is baked once, on the one worker its group goes to: with a pytest that
    xdist's loadgroup does not work with, every worker would bake and test every combination."""
    if not hasattr(request.config, "workerinput"):
        pytest.skip("not under xdist")
    assert request.node.nodeid.endswith("@grouping-check"), request.node.nodeid


def test_the_suite_runs_once_per_backend_and_database():
    assert (DEFAULT.task_backend, DEFAULT.database) == ("rq", "postgres")
    pairs = [(combo.task_backend, combo.database) for combo in SUITE_COMBOS]
    assert sorted(pairs) == sorted({(c.task_backend, c.database) for c in COMBOS})
    assert set(SUITE_COMBOS) >= FULL_SUITE_COMBOS


@pytest.mark.parametrize("combo", combo_params(SUITE_COMBOS))
def test_generated_test_suite_passes(baked, combo: Combo, request):
    project = baked(combo)
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    if combo not in FULL_SUITE_COMBOS:
        argv += ["-m", "not browser and not slow"]
    # A hang guard, not a timing check: the full suite takes ~12 min on a busy 2-core machine.
    result = run(argv, cwd=project, env=service_env(combo, request), timeout=1800)
    assert " passed" in result.stdout
    if combo in FULL_SUITE_COMBOS:
        # Browser tests and fuzzing must really run; only PostgreSQL-only tests skip on SQLite.
        skipped = [line for line in result.stdout.splitlines() if line.startswith("SKIPPED")]
        allowed = combo.database == "sqlite"
        assert all(allowed and "PostgreSQL" in line for line in skipped), skipped


@pytest.mark.parametrize(
    ("context", "message"),
    [
        ({"project_slug": "1st_app"}, "not a valid lowercase Python identifier"),
        ({"project_slug": "my-app"}, "not a valid lowercase Python identifier"),
        ({"project_slug": "class"}, "not a valid lowercase Python identifier"),
        ({"project_slug": "agentic_django"}, "clashes with a package"),
        ({"email": "nobody"}, "does not look like an email"),
        ({"project_name": 'The "Best" App', "project_slug": "best"}, "contains a double quote"),
        ({"description": "C:\\agents"}, "contains a double quote, a backslash"),
    ],
)
def test_bad_answers_are_rejected_with_a_clear_message(tmp_path, capfd, context, message):
    with pytest.raises(FailedHookException):
        bake(tmp_path, **context)
    assert message in capfd.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("option", ["task_backend", "database", "ci"])
def test_unknown_choices_are_rejected(tmp_path, option):
    with pytest.raises(ValueError, match=f"choice variable {option}"):
        bake(tmp_path, **{option: "celery"})


def test_every_combination_is_covered():
    assert len(COMBOS) == 12 and len(set(COMBOS)) == 12
