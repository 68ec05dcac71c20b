"""Errors that users see. Each names the problem and where it is."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType


class MedmoeError(Exception):
    """Base class: an error the CLI prints as one clear line, without a traceback."""


@dataclass
class Problem:
    """One problem in one place of one file (line or record are 1-based; None when not applicable)."""

    path: str
    message: str
    line: int | None = None
    record: str | None = None

    def __str__(self) -> str:
        where = self.path
        if self.line is not None:
            where += f":{self.line}"
        if self.record is not None:
            where += f" (record {self.record})"
        return f"{where}: {self.message}"


class DataError(MedmoeError):
    """A data file that cannot be loaded. Holds every problem found, not only the first."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        head = str(problems[0])
        more = f" (and {len(problems) - 1} more problems; run `medmoe data validate` to list them)" if len(problems) > 1 else ""
        super().__init__(head + more)

    @classmethod
    def single(cls, path: str | Path, message: str, line: int | None = None, record: str | None = None) -> DataError:
        return cls([Problem(str(path), message, line, record)])


class ModelError(MedmoeError):
    """A model that cannot be found, installed or loaded."""


class MissingExtra(MedmoeError, ImportError):
    """An optional dependency is not installed; the message names the pyproject extra that installs it
    (`serve`: fastapi, uvicorn; `plots`: matplotlib; `kernels`: ninja)."""

    def __init__(self, module: str, extra: str, purpose: str):
        self.module, self.extra = module, extra
        super().__init__(f"{purpose} needs {module}, which is not installed: pip install 'medmoe[{extra}]'")


def require(module: str, extra: str, purpose: str) -> ModuleType:
    """Import an optional dependency, or raise MissingExtra naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtra(module, extra, purpose) from exc
