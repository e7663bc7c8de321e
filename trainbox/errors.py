"""The few exception types trainbox raises on purpose; each carries the fix."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Problem:
    """One thing wrong with an input: where it is, what is wrong, how to fix it."""

    message: str
    line: int | None = None
    column: int | None = None
    key: str | None = None
    fix: str | None = None

    def render(self, file: str) -> str:
        where = file
        if self.line is not None:
            where += f":{self.line}"
            if self.column is not None:
                where += f":{self.column}"
        text = f"{where}: "
        if self.key:
            text += f"{self.key}: "
        text += self.message
        if self.fix:
            text += f"\n    fix: {self.fix}"
        return text

    def sentence(self) -> str:
        """One line, ``key: message; fix: ...``, for a stage's failure message."""
        text = f"{self.key}: {self.message}" if self.key else self.message
        return f"{text}; fix: {self.fix}" if self.fix else text


@dataclass
class InvalidInput(Exception):
    """A user-supplied file (dataset, job, config) cannot be used as it is."""

    file: str
    problems: list[Problem] = field(default_factory=list)
    summary: str = ""

    def __post_init__(self) -> None:
        super().__init__(self.render())

    def render(self) -> str:
        head = f"{self.file}: {self.summary}" if self.summary else f"{self.file}: invalid"
        body = "\n".join(p.render(self.file) for p in self.problems)
        return head + ("\n" + body if body else "")


class StageFailed(Exception):
    """A stage could not do its work; the message says why and what to change."""


class StopRequested(Exception):
    """Raised inside a stage after a stop signal once its state is safely saved (exit 75)."""


class DaemonAlreadyRunning(Exception):
    """Another daemon holds the home's lock."""
