"""Text from the farm made safe to print on a terminal (issue 11).

Job, stage and task names, commands, errors and log lines come from whoever
submitted the job or from what its tasks printed. Shown as they are, an
escape sequence in one of them would recolour, move the cursor of, retitle
or otherwise drive the user's terminal, and a NUL or a newline would garble
a table. :func:`printable` makes every such character visible in Python's
``repr`` notation (``\\x1b``, ``\\x00``, ``\\n``, ``\\u202e``): C0 and C1
control characters and DEL, Unicode format characters (bidirectional
overrides, zero-width characters), line and paragraph separators and lone
surrogates. Backslashes are left alone: the result is for reading, not for
parsing back. :func:`markup_safe` also escapes Rich markup (``[bold]``), for
text printed through a Rich console with markup on.

Where text is printed raw: ``herder logs`` writes a task's output as the
task's own bytes when its stream is not a terminal (a pipe or a file gets
exactly what the task printed); on a terminal the output is passed through
:func:`printable` (tabs kept).
"""

from __future__ import annotations

import re
import unicodedata

__all__ = ["control_problem", "markup_safe", "printable"]

_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]")  # C0, DEL and C1
_MAYBE_UNSAFE_RE = re.compile(r"[^\x20-\x7e]")  # ASCII printables need no look-up


def _escape(ch: str) -> str:
    o = ord(ch)
    if ch == "\n":
        return "\\n"
    if ch == "\r":
        return "\\r"
    if ch == "\t":
        return "\\t"
    if o <= 0xFF:
        return f"\\x{o:02x}"
    if o <= 0xFFFF:
        return f"\\u{o:04x}"
    return f"\\U{o:08x}"


def printable(text: object, *, keep_tabs: bool = False) -> str:
    """``text`` with every character that would act on a terminal shown escaped."""
    s = text if isinstance(text, str) else str(text)

    def sub(m: re.Match[str]) -> str:
        ch = m.group(0)
        if ch == "\t" and keep_tabs:
            return ch
        if unicodedata.category(ch) in _UNSAFE_CATEGORIES:
            return _escape(ch)
        return ch

    return _MAYBE_UNSAFE_RE.sub(sub, s)


def markup_safe(text: object) -> str:
    """:func:`printable`, with Rich markup escaped too (for a console with markup on)."""
    from rich.markup import escape

    return escape(printable(text))


def control_problem(value: str) -> tuple[int, str] | None:
    """The 0-based index and a description of the first control character in a name, or None."""
    m = _CONTROL_RE.search(value)
    if m is None:
        return None
    return m.start(), f"contains a control character {m.group(0)!r}; names must be printable"
