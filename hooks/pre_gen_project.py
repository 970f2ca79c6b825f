"""Reject answers that would produce a broken project, before any file is written."""

import keyword
import re
import sys

SLUG = "{{ cookiecutter.project_slug }}"
EMAIL = "{{ cookiecutter.email }}"
# Raw strings: a stray quote or backslash must reach the check, not break this file.
TEXT_ANSWERS = {
    "project_name": r"""{{ cookiecutter.project_name }}""",
    "description": r"""{{ cookiecutter.description }}""",
    "author_name": r"""{{ cookiecutter.author_name }}""",
}
CHOICES = {
    "task_backend": ("{{ cookiecutter.task_backend }}", ("rq", "database", "immediate")),
    "database": ("{{ cookiecutter.database }}", ("postgres", "sqlite")),
    "ci": ("{{ cookiecutter.ci }}", ("github", "none")),
}


def errors() -> list[str]:
    found = []
    if not re.fullmatch(r"[a-z][a-z0-9_]*", SLUG) or keyword.iskeyword(SLUG):
        found.append(
            f"project_slug {SLUG!r} is not a valid lowercase Python identifier: "
            "use letters, digits and underscores, starting with a letter (e.g. 'my_agents')."
        )
    elif SLUG in {"agentic_django", "chat", "config", "tests", "agents", "django", "test"}:
        found.append(
            f"project_slug {SLUG!r} clashes with a package the project uses: pick another name."
        )
    for name, value in TEXT_ANSWERS.items():
        if not value.strip() and name == "project_name":
            found.append("project_name is empty.")
        if any(char in value for char in '"\\') or "\n" in value:
            found.append(
                f"{name} {value!r} contains a double quote, a backslash or a line break: "
                "they would end up inside the project's TOML and Python strings."
            )
    if "@" not in EMAIL:
        found.append(f"email {EMAIL!r} does not look like an email address.")
    for name, (value, allowed) in CHOICES.items():
        if value not in allowed:
            found.append(f"{name} {value!r} is not one of: {', '.join(allowed)}.")
    return found


if __name__ == "__main__":
    problems = errors()
    for problem in problems:
        print(f"ERROR: {problem}", file=sys.stderr)
    sys.exit(1 if problems else 0)
