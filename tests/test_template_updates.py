"""Generated projects take later template changes: generation records the template and the
commit it came from (.cruft.json), and the project's `make template-update` (cruft update)
merges a newer template commit into a project that has changes of its own.

Everything happens in temporary git repositories: the template's current files committed as
commit A, a project baked from it with plain cookiecutter, then a template commit B. No network.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from scripts.bake import TEMPLATE

BIN = Path(sys.executable).parent
SETTINGS = "config/settings.py"
ENGINE_FILE = "agentic_django/services.py"
REGISTRY_SETTING = "AGENTIC_DJANGO_AGENT_REGISTRY = "
USER_AGENT = '''

def build_editor():
    """Added by the project's owner after generation."""
    return build_assistant()
'''
TEMPLATE_SETTING = "\n# Added by template commit B.\nAGENTIC_DJANGO_TEMPLATE_B = True\n"
TEMPLATE_ENGINE = (
    '\n\ndef template_b() -> str:\n    """Added by template commit B."""\n    return "B"\n'
)


def git(cwd: Path, *args: str) -> str:
    env = {
        **os.environ,
        "GIT_CONFIG_GLOBAL": os.devnull,
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_AUTHOR_NAME": "Test",
        "GIT_AUTHOR_EMAIL": "test@example.com",
        "GIT_COMMITTER_NAME": "Test",
        "GIT_COMMITTER_EMAIL": "test@example.com",
    }
    result = subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"git {' '.join(args)} failed in {cwd}:\n{result.stderr}"
    return result.stdout.rstrip("\n")


def commit_all(repo: Path, message: str) -> str:
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", message)
    return git(repo, "rev-parse", "HEAD")


def copy_template(destination: Path) -> Path:
    """The template's files as they are now (tracked or new, not git-ignored)."""
    listed = git(TEMPLATE, "ls-files", "-z", "--cached", "--others", "--exclude-standard")
    for relative in filter(None, listed.split("\0")):
        source = TEMPLATE / relative
        if source.is_file():
            (destination / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / relative)
    return destination


def cookiecutter(template: str, output_dir: Path, cwd: Path) -> tuple[Path, str]:
    """Plain `cookiecutter`, as a user runs it; returns the project and what it printed."""
    answers = ["task_backend=database", "database=sqlite", "ci=none"]
    result = subprocess.run(
        [BIN / "cookiecutter", "--no-input", template, "-o", str(output_dir), *answers],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return output_dir / "agentic_app", result.stdout + result.stderr


def project_command(project: Path, *argv: str) -> subprocess.CompletedProcess:
    """A command in the project with this environment's tools (cruft) first on PATH."""
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "GIT_CONFIG_GLOBAL": os.devnull}
    env.update({key: "Test" for key in ("GIT_AUTHOR_NAME", "GIT_COMMITTER_NAME")})
    env.update({key: "t@example.com" for key in ("GIT_AUTHOR_EMAIL", "GIT_COMMITTER_EMAIL")})
    return subprocess.run(argv, cwd=project, env=env, capture_output=True, text=True, timeout=300)


def template_update(project: Path) -> subprocess.CompletedProcess:
    """The generated README's command; RUN= runs cruft from PATH instead of the project's venv."""
    return project_command(project, "make", "--no-print-directory", "template-update", "RUN=")


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert text.count(old) == 1, f"{old!r} is not in {path} exactly once"
    path.write_text(text.replace(old, new))


def line_with(path: Path, prefix: str) -> str:
    (line,) = [line for line in path.read_text().splitlines() if line.startswith(prefix)]
    return line


@dataclass
class Setup:
    template: Path
    project: Path
    commit_a: str

    def template_commit(self, message: str, changes: dict[str, tuple[str, str] | str]) -> str:
        """Commit B: each project file gets `text` appended, or `(old, new)` replaced."""
        for relative, change in changes.items():
            path = self.template / "{{cookiecutter.project_slug}}" / relative
            if isinstance(change, str):
                path.write_text(path.read_text() + change)
            else:
                edit(path, *change)
        return commit_all(self.template, message)


@pytest.fixture
def setup(tmp_path) -> Setup:
    template = copy_template(tmp_path / "template")
    git(template, "init", "-q", "-b", "main")
    commit_a = commit_all(template, "A")
    project, _ = cookiecutter(str(template), tmp_path / "projects", cwd=tmp_path)
    git(project, "init", "-q", "-b", "main")
    commit_all(project, "Generated from the template")
    return Setup(template, project, commit_a)


def test_generation_records_the_template_and_commit(setup: Setup, tmp_path):
    state = json.loads((setup.project / ".cruft.json").read_text())
    assert (state["template"], state["commit"]) == (str(setup.template), setup.commit_a)
    answers = state["context"]["cookiecutter"]
    assert (answers["task_backend"], answers["database"], answers["ci"]) == (
        "database",
        "sqlite",
        "none",
    )
    assert answers["project_slug"] == "agentic_app"
    assert (answers["_template"], answers["_commit"]) == (str(setup.template), setup.commit_a)
    assert "_output_dir" not in answers and "_repo_dir" not in answers
    # `make demo` runs `cookiecutter .` inside the template: the path is recorded absolute.
    relative, _ = cookiecutter(".", tmp_path / "from-inside", cwd=setup.template)
    assert json.loads((relative / ".cruft.json").read_text())["template"] == str(setup.template)
    assert project_command(setup.project, str(BIN / "cruft"), "check").returncode == 0


def test_a_template_that_is_no_git_checkout_is_recorded_without_a_commit(setup: Setup, tmp_path):
    plain = shutil.copytree(setup.template, tmp_path / "plain-copy", ignore=lambda *_: {".git"})
    project, output = cookiecutter(str(plain), tmp_path / "from-plain", cwd=tmp_path)
    state = json.loads((project / ".cruft.json").read_text())
    assert (state["template"], state["commit"]) == (str(plain), None)
    assert "records no commit" in output and '"commit"' in output


def test_update_applies_the_template_change_and_keeps_the_users(setup: Setup):
    project = setup.project
    secrets_before = (project / ".env").read_text()
    with (project / "chat/registry.py").open("a") as registry:
        registry.write(USER_AGENT)
    commit_all(project, "Our own agent")
    commit_b = setup.template_commit(
        "B: a setting and an engine change",
        {SETTINGS: TEMPLATE_SETTING, ENGINE_FILE: TEMPLATE_ENGINE},
    )

    behind = project_command(project, str(BIN / "cruft"), "check")
    assert behind.returncode == 1 and "out of date" in behind.stdout + behind.stderr

    result = template_update(project)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (project / SETTINGS).read_text().endswith(TEMPLATE_SETTING)
    assert (project / ENGINE_FILE).read_text().endswith(TEMPLATE_ENGINE)
    assert (project / "chat/registry.py").read_text().endswith(USER_AGENT)
    assert json.loads((project / ".cruft.json").read_text())["commit"] == commit_b
    assert (project / ".env").read_text() == secrets_before, "the update replaced .env"
    changed = sorted(line[3:] for line in git(project, "status", "--porcelain").splitlines())
    assert changed == [".cruft.json", ENGINE_FILE, SETTINGS]
    assert project_command(project, str(BIN / "cruft"), "check").returncode == 0


def test_a_conflicting_change_is_reported_and_both_sides_kept(setup: Setup):
    project = setup.project
    settings = project / SETTINGS
    original = line_with(settings, REGISTRY_SETTING)
    ours = f'{REGISTRY_SETTING}"agents.registry.get_agent_registry"'
    edit(settings, original, ours)
    commit_all(project, "Our own registry")
    theirs = f"{original}  # changed by template commit B"
    setup.template_commit(
        "B: the same setting changed, and an engine change",
        {SETTINGS: (original, theirs), ENGINE_FILE: TEMPLATE_ENGINE},
    )

    result = template_update(project)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "conflict with yours in:\n  config/settings.py" in output
    merged = settings.read_text()
    assert "<<<<<<<" in merged and ">>>>>>>" in merged
    assert ours in merged.splitlines() and theirs in merged.splitlines()
    assert git(project, "diff", "--name-only", "--diff-filter=U") == SETTINGS
    # The rest of the update went in.
    assert (project / ENGINE_FILE).read_text().endswith(TEMPLATE_ENGINE)
