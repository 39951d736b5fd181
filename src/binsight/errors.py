"""The one exception type the CLI turns into a clean message instead of a traceback."""

from __future__ import annotations

from pydantic import ValidationError

_HINT = "\n  hint: "


class BinsightError(Exception):
    """A problem the user can fix: the message names it, the hint says what to do."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        # PyTorch hands an error raised in a DataLoader worker to the main process by building the
        # same type again from one string, "Caught BinsightError in DataLoader worker process 0.\n
        # Original Traceback ...", whose last line is "binsight.errors.BinsightError: MESSAGE". The
        # person needs what went wrong (a photo that cannot be read), not the worker's stack.
        kind = type(self)
        last_line = f"{kind.__module__}.{kind.__qualname__}: "
        if hint is None and message.startswith(f"Caught {kind.__name__} in ") and last_line in message:
            message, _, hint = message.rsplit(last_line, 1)[1].rstrip("\n").partition(_HINT)
            hint = hint or None
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}{_HINT}{self.hint}"


def invalid_settings(exc: ValidationError, hint: str | None = None) -> BinsightError:
    """One message for every rejected config, naming each setting as its flag (`--image-width`)."""
    problems = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"])
        problems.append(f"--{where.replace('_', '-')}: {error['msg']}" if where else error["msg"])
    return BinsightError("invalid settings: " + "; ".join(problems), hint=hint)
