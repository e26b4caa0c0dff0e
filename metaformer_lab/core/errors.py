"""User-facing errors. Every problem is an :class:`Issue` ``(path, message)``; errors carry all of them."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Issue:
    """One problem in user input: where (a spec path such as ``stages[2].block.token_mixer.num_heads``,
    or ``file.yaml:3:5`` for a YAML-level problem) and what."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class MetaformerLabError(Exception):
    """Base of the errors that mean "the user's input is wrong"; carries every issue found."""

    def __init__(self, issues: Iterable[Issue]) -> None:
        unique: dict[Issue, None] = dict.fromkeys(issues)
        if not unique:
            raise ValueError("an input error needs at least one issue")
        self.issues: tuple[Issue, ...] = tuple(unique)
        super().__init__("\n".join(str(i) for i in self.issues))

    @classmethod
    def single(cls, path: str, message: str) -> MetaformerLabError:
        return cls([Issue(path, message)])


class SpecError(MetaformerLabError):
    """An architecture spec (or a file it names) is invalid."""


class SpaceError(MetaformerLabError):
    """A search-space file (or a point of it) is invalid."""


class LatencyError(MetaformerLabError):
    """Invalid latency input: a duration, a device, a dtype, a GPU name, measurement settings, a profile."""


class StudyError(MetaformerLabError):
    """A search's settings, study or run folder are invalid (bad budget, study to resume, storage, ...)."""


class ShapeIssue(Exception):
    """Raised by an op's shape rule; ``field`` is relative to the op (``"num_heads"``, ``""`` for the op)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message
