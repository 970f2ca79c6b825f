"""The Docker stack and the generated CI of every combination, checked without a Docker engine:
compose.yaml through the real Compose v2 binary, the Dockerfile through BuildKit's own parser,
the workflow as YAML, and the commands they name run natively where that is cheap.
"""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path
from urllib.parse import urlsplit

import dockerfile
import pytest
import yaml

from scripts.native_stack import APP_SERVICES, compose, compose_config, read_dotenv
from tests.conftest import COMBOS, Combo, combo_params, manage, run

GITHUB_COMBOS = [c for c in COMBOS if c.ci == "github"]
# One bake per stack shape: the ci option does not change compose.yaml or the Dockerfile.
NO_CI_COMBOS = [c for c in COMBOS if c.ci == "none"]
SQLITE_NO_CI_COMBOS = [c for c in NO_CI_COMBOS if c.database == "sqlite"]
POSTGRES_NO_CI_COMBOS = [c for c in NO_CI_COMBOS if c.database == "postgres"]
WORKER_COMMAND = ["python", "manage.py", "agentic_django_worker"]
WEB_COMMAND = [
    "uvicorn", "config.asgi:application",
    "--host", "0.0.0.0", "--port", "8000", "--lifespan", "off",
]  # fmt: skip


def expected_services(combo: Combo) -> set[str]:
    services = {"web", "migrate"}
    if combo.task_backend != "immediate":
        services.add("worker")
    if combo.database == "postgres":
        services.add("postgres")
    if combo.task_backend == "rq":
        services.add("redis")
    return services


def backing_services(combo: Combo) -> set[str]:
    return expected_services(combo) & {"postgres", "redis"}


def parse_dockerfile(project: Path) -> list:
    return list(dockerfile.parse_file(str(project / "Dockerfile")))


def build_args(commands: list) -> dict[str, str]:
    return dict(c.value[0].split("=", 1) for c in commands if c.cmd == "ARG" and "=" in c.value[0])


def stages(commands: list) -> list[list]:
    """Instructions grouped per build stage (each starts at a FROM)."""
    grouped: list[list] = []
    for command in commands:
        if command.cmd == "FROM":
            grouped.append([])
        if grouped:
            grouped[-1].append(command)
    return grouped


def workflow(project: Path) -> dict:
    return yaml.safe_load((project / ".github/workflows/ci.yml").read_text())


def steps_running(job: dict, needle: str) -> list[dict]:
    return [step for step in job["steps"] if needle in step.get("run", "")]


@pytest.mark.parametrize("combo", combo_params())
def test_compose_file_is_valid_with_exactly_the_services_the_options_need(baked, combo: Combo):
    project = baked(combo)
    result = compose(project, "config", "--quiet")
    assert result.returncode == 0, result.stderr
    assert set(compose_config(project)["services"]) == expected_services(combo)


@pytest.mark.parametrize("combo", combo_params(NO_CI_COMBOS))
def test_app_services_run_one_image_with_the_env_file(baked, combo: Combo):
    project = baked(combo)
    services = compose_config(project)["services"]
    secret = read_dotenv(project / ".env")["SECRET_KEY"]
    apps = [name for name in APP_SERVICES if name in services]
    assert len({services[name]["image"] for name in apps}) == 1
    for name in apps:
        service = services[name]
        assert Path(service["build"]["context"]) == project
        assert service["environment"]["SECRET_KEY"] == secret, f"{name} does not get .env"
        expected_restart = "no" if name == "migrate" else "unless-stopped"
        assert service["restart"] == expected_restart, name
    for name in backing_services(combo):
        assert services[name]["restart"] == "unless-stopped"
    raw = yaml.safe_load((project / "compose.yaml").read_text())
    assert raw["x-app"]["env_file"] == ".env"


@pytest.mark.parametrize("combo", combo_params(NO_CI_COMBOS))
def test_migrations_run_once_after_the_backing_services_are_healthy(baked, combo: Combo):
    services = compose_config(baked(combo))["services"]
    healthy = {name: "service_healthy" for name in backing_services(combo)}
    assert services["migrate"]["command"] == ["python", "manage.py", "migrate", "--no-input"]
    # Migrations need the database only.
    assert _conditions(services["migrate"]) == {
        name: condition for name, condition in healthy.items() if name == "postgres"
    }
    for name in ("web", "worker"):
        if name in services:
            assert _conditions(services[name]) == {
                "migrate": "service_completed_successfully",
                **healthy,
            }, name


def _conditions(service: dict) -> dict[str, str]:
    return {name: dep["condition"] for name, dep in service.get("depends_on", {}).items()}


@pytest.mark.parametrize("combo", combo_params(NO_CI_COMBOS))
def test_commands_and_health_checks(baked, combo: Combo):
    project = baked(combo)
    services = compose_config(project)["services"]
    assert services["web"]["command"] == WEB_COMMAND
    web_check = services["web"]["healthcheck"]["test"]
    assert web_check == ["CMD", "python", "docker/healthcheck.py"]
    assert (project / "docker/healthcheck.py").is_file()
    assert services["migrate"]["healthcheck"] == {"disable": True}
    if combo.task_backend == "immediate":
        assert "worker" not in services
    else:
        assert services["worker"]["command"] == WORKER_COMMAND
        # Healthy while the worker renews its heartbeat (no Agents SDK import to check it).
        check = services["worker"]["healthcheck"]
        assert check["test"] == ["CMD", "python", "manage.py", "agentic_django_worker", "--check"]
        assert check["start_period"] and check["interval"]
    if "postgres" in services:
        assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])
    if "redis" in services:
        assert services["redis"]["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]


@pytest.mark.parametrize("combo", combo_params(NO_CI_COMBOS))
def test_only_web_is_published_and_workers_scale(baked, combo: Combo):
    services = compose_config(baked(combo))["services"]
    ports = services["web"]["ports"]
    assert [(p["target"], p["published"]) for p in ports] == [(8000, "8000")]
    for name, service in services.items():
        assert "container_name" not in service, f"{name} could not be scaled"
        if name != "web":
            assert "ports" not in service, f"{name} is published to the host"


@pytest.mark.parametrize("combo", combo_params(NO_CI_COMBOS))
def test_app_services_reach_the_bundled_database_and_redis(baked, combo: Combo):
    project = baked(combo)
    config = compose_config(project)
    services = config["services"]
    apps = [name for name in APP_SERVICES if name in services]
    if combo.database == "postgres":
        postgres = services["postgres"]
        database_env = postgres["environment"]
        assert (
            database_env["POSTGRES_PASSWORD"] == read_dotenv(project / ".env")["POSTGRES_PASSWORD"]
        )
        for name in apps:
            url = urlsplit(services[name]["environment"]["DATABASE_URL"])
            assert (url.scheme, url.hostname, url.port) == ("postgres", "postgres", 5432)
            assert url.username == database_env["POSTGRES_USER"]
            assert url.password == database_env["POSTGRES_PASSWORD"]
            assert url.path == "/" + database_env["POSTGRES_DB"]
        assert _volume_mounts(postgres) == {"postgres-data": "/var/lib/postgresql/data"}
        assert "postgres-data" in config["volumes"]
    else:
        for name in apps:
            assert services[name]["environment"]["DATABASE_URL"] == "sqlite:////data/db.sqlite3"
            assert _volume_mounts(services[name]) == {"app-data": "/data"}, name
        assert "app-data" in config["volumes"]
    for name in apps:
        redis_url = services[name]["environment"].get("REDIS_URL")
        if combo.task_backend == "rq":
            assert redis_url == "redis://redis:6379/0"
            assert _volume_mounts(services["redis"]) == {"redis-data": "/data"}
        else:
            assert redis_url is None


def _volume_mounts(service: dict) -> dict[str, str]:
    return {
        volume["source"]: volume["target"]
        for volume in service.get("volumes", [])
        if volume["type"] == "volume"
    }


@pytest.mark.parametrize(
    "combo", combo_params([c for c in NO_CI_COMBOS if c.database == "postgres"])
)
def test_compose_refuses_to_start_postgres_without_a_password(baked, combo: Combo, tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(baked(combo) / "compose.yaml", project)
    env = (baked(combo) / ".env").read_text()
    (project / ".env").write_text(re.sub(r"(?m)^POSTGRES_PASSWORD=.*\n", "", env))
    result = compose(project, "config", "--quiet")
    assert result.returncode != 0
    assert "set POSTGRES_PASSWORD in .env" in result.stderr


@pytest.mark.parametrize("combo", combo_params(NO_CI_COMBOS))
def test_env_example_documents_every_variable(baked, combo: Combo):
    project = baked(combo)
    documented = set(
        re.findall(r"(?m)^#?\s*([A-Z][A-Z0-9_]+)=", (project / ".env.example").read_text())
    )
    settings = (project / "config/settings.py").read_text()
    read_by_settings = set(re.findall(r"\benv(?:\.\w+)?\(\s*\"([A-Z][A-Z0-9_]+)\"", settings))
    assert read_by_settings, "no env() calls found in settings: has the settings style changed?"
    compose_text = (project / "compose.yaml").read_text()
    # ${VAR} comes from .env; $${VAR} is escaped, for the container's own shell.
    interpolated = set(re.findall(r"(?<!\$)\$\{([A-Z][A-Z0-9_]+)", compose_text))
    written_by_hook = set(read_dotenv(project / ".env"))
    missing = (read_by_settings | interpolated | written_by_hook) - documented
    assert sorted(missing) == []
    required = set(re.findall(r"\$\{([A-Z][A-Z0-9_]+):\?", compose_text))
    assert required <= written_by_hook, "the generated .env must set what compose requires"


@pytest.mark.parametrize("combo", combo_params(NO_CI_COMBOS))
def test_dockerfile_builds_a_small_non_root_image_like_ci_installs(baked, combo: Combo):
    project = baked(combo)
    commands = parse_dockerfile(project)
    build, runtime = stages(commands)
    assert [c.value[0] for c in (build[0], runtime[0])] == ["${PYTHON_IMAGE}"] * 2
    assert build_args(commands)["PYTHON_IMAGE"] == "python:3.12-slim"

    build_runs = " ".join(c.value[0] for c in build if c.cmd == "RUN")
    assert "uv sync --locked --no-dev" in build_runs and "uv sync --no-dev" in build_runs
    collect = next(c.value[0] for c in build if c.cmd == "RUN" and "collectstatic" in c.value[0])
    build_secret = re.search(r"SECRET_KEY=(\S+)", collect).group(1)
    assert build_secret != read_dotenv(project / ".env")["SECRET_KEY"]
    assert not any(c.cmd == "RUN" and "uv" in c.value[0].split() for c in runtime), "uv in runtime"
    assert all(
        not c.value or ".env" not in " ".join(c.value) for c in commands if c.cmd in {"COPY", "ADD"}
    )

    users = [c.value[0] for c in runtime if c.cmd == "USER"]
    assert users and users[-1].split(":")[0] not in {"root", "0"}
    healthcheck = next(c for c in runtime if c.cmd == "HEALTHCHECK")
    assert healthcheck.value == ("CMD", "python", "docker/healthcheck.py")
    cmd = next(c for c in runtime if c.cmd == "CMD")
    assert cmd.json and list(cmd.value) == WEB_COMMAND
    assert next(c for c in runtime if c.cmd == "EXPOSE").value == ("8000",)


@pytest.mark.parametrize("combo", combo_params(NO_CI_COMBOS[:1]))
def test_dockerignore_keeps_secrets_and_local_state_out(baked, combo: Combo):
    lines = (baked(combo) / ".dockerignore").read_text().split()
    for pattern in (".env", ".git", ".venv", "**/db.sqlite3*", "**/__pycache__", "test-artifacts"):
        assert pattern in lines, pattern
    assert "!.env" not in lines


@pytest.mark.parametrize("combo", combo_params(SQLITE_NO_CI_COMBOS))
def test_compose_migrate_and_worker_commands_run_natively(baked, combo: Combo, request, tmp_path):
    """The exact compose commands work against this project (Postgres ones: see test_stack.py)."""
    project = baked(combo)
    services = compose_config(project)["services"]
    env = {"DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}"}
    if combo.task_backend == "rq":
        env["REDIS_URL"] = request.getfixturevalue("redis_server").url
    manage(project, *services["migrate"]["command"][2:], env=env)
    if combo.task_backend == "immediate":
        return
    # The same command, told to stop once the queue is empty.
    argv = [sys.executable, *services["worker"]["command"][1:], "--burst"]
    result = run(argv, cwd=project, env=env, timeout=120)
    assert "Preloaded the Agents SDK" in result.stdout + result.stderr


@pytest.mark.parametrize("combo", combo_params())
def test_ci_workflow_exists_only_when_asked(baked, combo: Combo):
    assert (baked(combo) / ".github/workflows/ci.yml").is_file() == (combo.ci == "github")


@pytest.mark.parametrize("combo", combo_params(GITHUB_COMBOS))
def test_ci_runs_the_project_commands_with_matching_service_containers(baked, combo: Combo):
    project = baked(combo)
    flow = workflow(project)
    test_job = flow["jobs"]["test"]
    services = test_job.get("services", {})
    assert set(services) == backing_services(combo)
    env = test_job["env"]
    if combo.database == "postgres":
        postgres = services["postgres"]
        url = urlsplit(env["DATABASE_URL"])
        assert postgres["image"] == compose_config(project)["services"]["postgres"]["image"]
        assert f"{url.port}:5432" in postgres["ports"]
        assert (url.username, url.password, url.path) == (
            postgres["env"]["POSTGRES_USER"],
            postgres["env"]["POSTGRES_PASSWORD"],
            "/" + postgres["env"]["POSTGRES_DB"],
        )
        assert "pg_isready" in postgres["options"]
    else:
        assert "DATABASE_URL" not in env
    if combo.task_backend == "rq":
        redis = services["redis"]
        assert redis["image"] == compose_config(project)["services"]["redis"]["image"]
        assert env["REDIS_URL"] == "redis://localhost:6379/0" and "6379:6379" in redis["ports"]
        assert "redis-cli ping" in redis["options"]

    uses = [step.get("uses", "") for step in test_job["steps"]]
    assert any(u.startswith("astral-sh/setup-uv@") for u in uses)
    makefile_targets = set(re.findall(r"(?m)^([a-z-]+):", (project / "Makefile").read_text()))
    for target in ("install", "lint", "test"):
        assert steps_running(test_job, f"make {target}"), target
        assert target in makefile_targets
    assert steps_running(test_job, "makemigrations --check")
    assert steps_running(test_job, "check --deploy --fail-level WARNING")


@pytest.mark.parametrize("combo", combo_params(GITHUB_COMBOS))
def test_ci_pins_the_same_tools_as_the_image(baked, combo: Combo):
    project = baked(combo)
    flow_env = workflow(project)["env"]
    args = build_args(parse_dockerfile(project))
    assert args["PYTHON_IMAGE"] == f"python:{flow_env['PYTHON_VERSION']}-slim"
    assert args["UV_VERSION"] == flow_env["UV_VERSION"]
    setup_uv = next(
        s for s in workflow(project)["jobs"]["test"]["steps"] if "setup-uv" in s.get("uses", "")
    )
    assert setup_uv["with"]["version"] == "${{ env.UV_VERSION }}"


@pytest.mark.parametrize("combo", combo_params(GITHUB_COMBOS))
def test_ci_builds_the_image_and_waits_for_a_healthy_stack(baked, combo: Combo):
    docker_job = workflow(baked(combo))["jobs"]["docker"]
    assert steps_running(docker_job, "cp .env.example .env")
    assert steps_running(docker_job, "docker compose up --build --detach --wait")
    assert steps_running(docker_job, "/healthz/")


@pytest.mark.parametrize("combo", combo_params(GITHUB_COMBOS))
def test_ci_checks_pass_with_the_workflow_environment(baked, combo: Combo, request, tmp_path):
    """The CI steps' own env (and no .env, which git ignores) makes Django start and pass."""
    project = tmp_path / "checkout"
    shutil.copytree(baked(combo), project, ignore=shutil.ignore_patterns(".env", "__pycache__"))
    test_job = workflow(project)["jobs"]["test"]
    job_env = dict(test_job["env"])
    if combo.database == "postgres":
        # Same credentials as the CI service container, on the local test server's port.
        local = urlsplit(request.getfixturevalue("postgres").url)
        job_env["DATABASE_URL"] = job_env["DATABASE_URL"].replace(":5432/", f":{local.port}/")
    for needle in ("makemigrations --check", "check --deploy"):
        (step,) = steps_running(test_job, needle)
        argv = step["run"].split()
        assert argv[:4] == ["uv", "run", "--no-sync", "python"]
        manage(project, *argv[5:], env={**job_env, **step.get("env", {})})
