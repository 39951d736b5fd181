"""Credentials never leave the process: any URL's password is replaced by `***` before it is printed,
logged, written to a file or put in an error.

Database URLs (`postgresql+psycopg2://user:PASSWORD@host/db`) and HTTP endpoints with basic auth carry
passwords in their userinfo; `redact` rewrites every such URL inside a text. A logging filter applies it
to every record the process logs (installed by the CLI on the root handlers), so a message written by a
library (SQLAlchemy, Optuna, botocore) is covered too, not only binsight's own.
"""

from __future__ import annotations

import logging
import re
from typing import Annotated

from pydantic import PlainSerializer, SerializationInfo

# scheme://user:password@  -> scheme://user:***@ ; the password may hold anything but '@' and '/'.
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<user>[^:/@\s]*):(?P<password>[^@/\s]+)@")
# key=value secrets in libpq connection strings and query strings (password=..., sslpassword=...).
_KEYWORD = re.compile(
    r"(?P<key>\b(?:password|passwd|pwd|sslpassword|secret|token)=)(?P<value>[^&\s;'\"]+)", re.I
)
MASK = "***"


def redact(text: str) -> str:
    """`text` with every URL password and `password=` value replaced by ***."""
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:{MASK}@", text)
    return _KEYWORD.sub(lambda m: f"{m['key']}{MASK}", text)


class RedactingFilter(logging.Filter):
    """Redacts the formatted message of every record (arguments included) before a handler writes it."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record: leave it to the handler to report
            return True
        cleaned = redact(message)
        if record.exc_info and record.exc_info[1] is not None:
            # The traceback's text is rendered by the formatter later; render it redacted now instead.
            cleaned += "\n" + redact(logging.Formatter().formatException(record.exc_info))
            record.exc_info, record.exc_text = None, None
        record.msg, record.args = cleaned, None
        return True


def configure_logging(verbose: bool = False) -> None:
    """binsight's log lines on stderr, secrets redacted: the CLI's and every server worker's (uvicorn's
    own loggers propagate here; they get no handlers of their own)."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    install_redaction()


def install_redaction(logger: logging.Logger | None = None) -> None:
    """Add the filter to every handler of `logger` (the root logger by default), once."""
    target = logger or logging.getLogger()
    for handler in target.handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())


def _serialise_secret_url(value: str, info: SerializationInfo) -> str:
    # Processes that must hand the real value on (the server's worker processes) ask for it explicitly.
    if info.context and info.context.get("with_secrets"):
        return value
    return redact(value)


# A config field that may hold a URL with credentials: the value is intact in memory, and written out
# (config.json, plan.json, summaries, `--config` dumps) with its password as ***.
SecretUrl = Annotated[str, PlainSerializer(_serialise_secret_url, return_type=str, when_used="json")]
