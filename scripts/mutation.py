"""Mutation testing of the engine (`make mutation`): bake a project, let mutmut change the
engine's code one small edit at a time, and see whether the engine's tests notice.

    make mutation                                        # SQLite, every engine module
    make mutation ARGS="--database postgres"             # PostgreSQL (throwaway server)
    make mutation ARGS="--modules lifecycle sessions"    # some modules
    make mutation ARGS="--modules lifecycle --mutants 'agentic_django.lifecycle.x_give_up*'"

The project is baked with `task_backend=database` into `--workdir` (default
`.cache/mutation/<database>`); mutmut (pinned in requirements.txt) copies it to `mutants/`, runs
the engine's tests (`tests/core`, the streaming tests of `tests/providers`) once to learn which
test covers which function, then runs each mutant against the tests that cover it. The report
(`report.md` in the work directory) gives the score per module and the diff of every mutant
that survived or timed out; docs/mutation-testing.md keeps the latest results and why each
survivor is acceptable or what was done about it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

from scripts.bake import TEMPLATE, bake
from scripts.servers import start_postgres

MODULES = (
    "lifecycle",
    "dispatch",
    "prepared",
    "recovery",
    "execution",
    "sessions",
    "events",
    "toolcalls",
    "streams",
    "db",
)
MUTMUT = Path(sys.executable).parent / "mutmut"
CONFIG = """
[tool.mutmut]
source_paths = ["agentic_django/"]
only_mutate = {only}
also_copy = ["manage.py", ".env", "config/", "chat/", "templates/"]
# The worker-process test runs unmutated code in a subprocess: left out (-m "not slow").
pytest_add_cli_args = [
    "-p", "no:xdist", "-p", "no:cacheprovider", "-m", "not slow and not browser", "--reuse-db"
]
pytest_add_cli_args_test_selection = [
    "tests/core", "tests/test_documented_example.py", "tests/providers/test_streaming.py"
]
"""


def prepare(workdir: Path, database: str, modules: list[str]) -> Path:
    """A freshly baked project in ``workdir`` with mutmut configured for ``modules``."""
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    project = bake(workdir, task_backend="database", database=database, ci="none")
    only = "[" + ", ".join(f'"agentic_django/{name}.py"' for name in modules) + "]"
    with (project / "pyproject.toml").open("a") as pyproject:
        pyproject.write(CONFIG.format(only=only))
    return project


def results(project: Path) -> dict[str, str]:
    """mutant name -> status, from `mutmut results --all true`."""
    output = subprocess.run(
        [str(MUTMUT), "results", "--all", "true"],
        cwd=project,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return dict(re.findall(r"^\s*(\S+): (.+)$", output, re.MULTILINE))


def diff(project: Path, mutant: str) -> str:
    shown = subprocess.run(
        [str(MUTMUT), "show", mutant], cwd=project, capture_output=True, text=True
    ).stdout
    return "\n".join(
        line
        for line in shown.splitlines()
        if line[:1] in "+-" and not line.startswith(("+++", "---"))
    )


def report(project: Path, database: str) -> str:
    statuses = {
        name: status for name, status in results(project).items() if status != "not checked"
    }
    per_module: dict[str, Counter[str]] = {}
    for name, status in statuses.items():
        module = name.split(".")[1]
        per_module.setdefault(module, Counter())[status] += 1
    lines = [f"# Mutation testing on {database}", "", "| module | mutants | killed | survived "
             "| timeout | score |", "| --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for module, counts in sorted(per_module.items()):
        total = sum(counts.values())
        killed = counts["killed"]
        lines.append(
            f"| {module} | {total} | {killed} | {counts['survived']} | {counts['timeout']} "
            f"| {100 * (killed + counts['timeout']) / total:.1f}% |"
        )
    lines += ["", "## Surviving mutants", ""]
    for name, status in sorted(statuses.items()):
        if status not in ("killed", "timeout"):
            lines += [f"### {name} ({status})", "", "```diff", diff(project, name), "```", ""]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--modules", nargs="+", choices=MODULES, default=list(MODULES))
    parser.add_argument(
        "--mutants", nargs="+", default=[], help="only these mutants (mutmut names, * allowed)"
    )
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--max-children", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    workdir = (args.workdir or TEMPLATE / ".cache" / "mutation" / args.database).resolve()
    project = prepare(workdir, args.database, args.modules)
    env = {**os.environ, "OPENAI_AGENTS_DISABLE_TRACING": "1"}
    # One test database for the whole run, reused by every mutant's test session.
    env["AGENTIC_TEST_DB_DIR"] = str(workdir / "test-db")
    with contextlib.ExitStack() as stack:
        if args.database == "postgres":
            server = start_postgres()
            stack.callback(server.stop)
            env["DATABASE_URL"] = server.url
        mutmut = [str(MUTMUT), "run", "--max-children", str(args.max_children), *args.mutants]
        subprocess.run(mutmut, cwd=project, env=env, check=False)
        text = report(project, args.database)
    (workdir / "report.md").write_text(text)
    print(text)
    print(f"Report: {workdir / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
