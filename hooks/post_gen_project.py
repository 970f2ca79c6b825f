"""Prune files the chosen options do not need and write a local .env with a fresh secret."""

import secrets
import shutil
from pathlib import Path

PROJECT = Path.cwd()
SLUG = "{{ cookiecutter.project_slug }}"
TASK_BACKEND = "{{ cookiecutter.task_backend }}"
DATABASE = "{{ cookiecutter.database }}"
CI = "{{ cookiecutter.ci }}"

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
    # Caches from working inside the template checkout never belong in a new project.
    for pattern in ("__pycache__", ".ruff_cache", ".pytest_cache", "test-artifacts"):
        for path in sorted(PROJECT.rglob(pattern), reverse=True):
            remove(str(path.relative_to(PROJECT)))
    if TASK_BACKEND != "rq":
        remove("config/worker.py")


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


if __name__ == "__main__":
    prune()
    write_env()
