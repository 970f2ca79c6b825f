"""Bake a project from this template, as `cookiecutter` does, with some of the answers given."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cookiecutter.main import cookiecutter

TEMPLATE = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Combo:
    """One combination of the options that change what a project contains."""

    task_backend: str
    database: str
    ci: str

    @property
    def id(self) -> str:
        return f"{self.task_backend}-{self.database}-{self.ci}"

    @property
    def context(self) -> dict[str, str]:
        return {"task_backend": self.task_backend, "database": self.database, "ci": self.ci}


def bake(output_dir: Path, **context: str) -> Path:
    """The project directory cookiecutter wrote into `output_dir`."""
    project = cookiecutter(
        str(TEMPLATE), no_input=True, extra_context=context, output_dir=output_dir
    )
    return Path(project)
