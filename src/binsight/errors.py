"""The one exception type the CLI turns into a clean message instead of a traceback."""

from __future__ import annotations

from pydantic import ValidationError


class BinsightError(Exception):
    """A problem the user can fix: the message names it, the hint says what to do."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  hint: {self.hint}"


def invalid_settings(exc: ValidationError, hint: str | None = None) -> BinsightError:
    """One message for every rejected config, naming each setting as its flag (`--image-width`)."""
    problems = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"])
        problems.append(f"--{where.replace('_', '-')}: {error['msg']}" if where else error["msg"])
    return BinsightError("invalid settings: " + "; ".join(problems), hint=hint)
