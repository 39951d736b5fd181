"""The one exception type the CLI turns into a clean message instead of a traceback."""


class BinsightError(Exception):
    """A problem the user can fix: the message names it, the hint says what to do."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  hint: {self.hint}"
