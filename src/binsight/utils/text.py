"""Text from files and manifests, made safe for where it is shown: spreadsheets and terminals.

A manifest row is whatever its author (or an attacker who can write it) put there. In a CSV opened by
a spreadsheet, a cell starting with `=`, `+`, `-`, `@`, TAB or CR is a formula (`=HYPERLINK(...)`,
`+cmd|' /C calc'!A0`); OWASP's advice is to prefix such a cell with a single quote, which spreadsheets
show as text. Control characters (ESC sequences rewrite a terminal; BEL, NUL) and invisible ones are
removed everywhere.
"""

from __future__ import annotations

import unicodedata

_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
_INVISIBLE = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})


def printable(text: str) -> str:
    """`text` without control, format or separator characters (which can hide or rewrite what is shown)."""
    if text.isprintable():
        return text
    return "".join(char for char in text if unicodedata.category(char) not in _INVISIBLE)


def spreadsheet_safe(text: str) -> str:
    """A cell a spreadsheet shows as text, never evaluates."""
    text = printable(text)
    return "'" + text if text.startswith(_FORMULA_STARTS) else text


# The largest count read: more than any bin holds, and within the int64 arrays counts end up in.
MAX_COUNT_DIGITS = 9
MAX_COUNT = 10**MAX_COUNT_DIGITS - 1


def whole_number(text: str | None, max_digits: int = MAX_COUNT_DIGITS) -> int | None:
    """The count a cell or a name spells in ASCII digits (`" 12 "` is 12), else None.

    `str.isdigit` is not the test: it accepts characters `int` refuses (`"²"`, `"①"`)."""
    text = (text or "").strip()
    if not (text.isascii() and text.isdigit() and len(text) <= max_digits):
        return None
    return int(text)
