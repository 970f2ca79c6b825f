"""Prune files the chosen options do not need, write a local .env with a fresh secret, and
record where the project came from (.cruft.json) so that `cruft update` can bring in later
template changes."""

import json
import os
import secrets
import shutil
import subprocess
from pathlib import Path

PROJECT = Path.cwd()
SLUG = "{{ cookiecutter.project_slug }}"
TASK_BACKEND = "{{ cookiecutter.task_backend }}"
DATABASE = "{{ cookiecutter.database }}"
CI = "{{ cookiecutter.ci }}"
# Every answer plus cookiecutter's own keys (_template, _repo_dir, _checkout, ...).
CONTEXT = json.loads(r"""{{ cookiecutter | jsonify }}""")
# Where this run's template sat on disk: of no use later, so left out of .cruft.json.
LOCAL_KEYS = ("_output_dir", "_repo_dir", "_checkout")

SECRET_ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!@%^&*(-_=+)"


def remove(*relative_paths: str) -> None:
    for relative in relative_paths:
        path = PROJECT / relative
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def prune() -> None:
    if CI != "github":
        remove(".github")
    if TASK_BACKEND != "database":
        remove("tests/core/test_database_worker.py")  # django-tasks-db is not installed
    # Caches from working inside the template checkout never belong in a new project.
    for pattern in ("__pycache__", ".ruff_cache", ".pytest_cache", "test-artifacts"):
        for path in sorted(PROJECT.rglob(pattern), reverse=True):
            remove(str(path.relative_to(PROJECT)))


def write_env() -> None:
    secret = "".join(secrets.choice(SECRET_ALPHABET) for _ in range(64))
    lines = [
        "# Local development settings; git-ignored. See .env.example for every variable.",
        f"SECRET_KEY={secret}",
        "DEBUG=True",
        "ALLOWED_HOSTS=localhost,127.0.0.1,[::1]",
    ]
    if DATABASE == "postgres":
        lines.append(f"DATABASE_URL=postgres://{SLUG}:{SLUG}@localhost:5432/{SLUG}")
    else:
        lines.append("# DATABASE_URL unset: SQLite at db.sqlite3 in the project directory")
    if TASK_BACKEND == "rq":
        lines.append("REDIS_URL=redis://localhost:6379/0")
    if DATABASE == "postgres":
        lines.append("# Password of the compose stack's own PostgreSQL (compose.yaml)")
        lines.append(f"POSTGRES_PASSWORD={secrets.token_urlsafe(24)}")
    lines.append("# OPENAI_API_KEY=sk-...  (unset: agents answer with the offline demo model)")
    (PROJECT / ".env").write_text("\n".join(lines) + "\n")


def git(directory: Path, *args: str) -> str | None:
    try:
        result = subprocess.run(
            ["git", "-C", str(directory), *args], capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return result.stdout.strip()


def template_dir() -> Path | None:
    """The template directory on disk (cookiecutter may name it relative to where it ran)."""
    raw = CONTEXT.get("_repo_dir")
    if not raw:
        return None
    candidates = [Path(raw)]
    if not Path(raw).is_absolute():
        # cookiecutter runs this hook from inside the template directory.
        candidates = [Path(f"/proc/{os.getppid()}/cwd"), Path(os.environ.get("PWD", ".")) / raw]
    for candidate in candidates:
        if (candidate / "cookiecutter.json").is_file():
            return candidate.resolve()
    return None


def template_url(template: str, directory: Path | None) -> str:
    """What `cruft update` clones: the repository URL, or the absolute path of a local one."""
    try:
        from cookiecutter.config import get_user_config
        from cookiecutter.repository import expand_abbreviations, is_repo_url

        expanded = expand_abbreviations(template, get_user_config()["abbreviations"])
        if is_repo_url(expanded):
            return expanded.removeprefix("git+")
    except Exception:  # a hook must not fail on how cookiecutter was called
        pass
    return str(directory) if directory is not None else template


def template_commit(directory: Path | None) -> str | None:
    """The commit of the template checkout, if it is the root of a git repository."""
    if directory is None:
        return None
    top = git(directory, "rev-parse", "--show-toplevel")
    if top is None or Path(top).resolve() != directory:
        return None
    commit = git(directory, "rev-parse", "HEAD")
    if commit and git(directory, "status", "--porcelain"):
        print(
            f"Note: the template at {directory} has uncommitted changes; this project includes "
            f"them, but .cruft.json can only record its last commit, {commit[:12]}."
        )
    return commit


def write_cruft_state() -> None:
    """.cruft.json as `cruft create` writes it, so `cruft check` and `cruft update` work."""
    if "_commit" in CONTEXT:
        return  # cruft itself is generating (cruft create/update): it writes .cruft.json
    directory = template_dir()
    url = template_url(CONTEXT.get("_template", ""), directory)
    commit = template_commit(directory)
    # The answers in the order of the template's prompts, as cruft records them.
    order = list(json.loads((directory / "cookiecutter.json").read_text())) if directory else []
    keys = [key for key in order if key in CONTEXT] + sorted(CONTEXT.keys() - set(order))
    context = {key: CONTEXT[key] for key in keys if key not in LOCAL_KEYS}
    state = {
        "template": url,
        "commit": commit,
        "checkout": CONTEXT.get("_checkout"),
        "context": {"cookiecutter": {**context, "_template": url, "_commit": commit}},
        "directory": None,
    }
    text = json.dumps(state, ensure_ascii=False, indent=2, separators=(",", ": "))
    (PROJECT / ".cruft.json").write_text(text + "\n")
    if commit is None:
        print(
            f"Note: the template {url} is not a git checkout, so .cruft.json records no commit. "
            'To take template updates later, set "template" in .cruft.json to the template\'s '
            'git repository and "commit" to the commit this project was generated from.'
        )


if __name__ == "__main__":
    prune()
    write_env()
    write_cruft_state()
