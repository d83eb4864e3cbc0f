"""Progress patterns (issue 13): the rules shared by the API's validation and the agent.

A task's ``progress_pattern`` is a Python regular expression with exactly one
capturing group, matched against each line of its stdout and stderr (with
``re.search``); the group must read as a number from 0 to 100, e.g.
``r"(\\d+(?:\\.\\d+)?)%"`` or ``r"^Fra:\\d+ .* (\\d+)/100"``. The latest
matching line gives the task's progress; a match whose group is not such a
number is ignored.

The pattern runs on the agent, over what the task prints: its length and the
length of a line it sees are bounded (``PROGRESS_PATTERN_MAX``,
``PROGRESS_LINE_MAX``) so that a pathological pattern costs its own task's
agent little, and it is compiled at the door so a bad one never reaches an
agent.
"""

from __future__ import annotations

import re

#: The longest progress pattern accepted, in characters.
PROGRESS_PATTERN_MAX = 500
#: Only the first this many characters of a line are matched.
PROGRESS_LINE_MAX = 1024
#: The longest ``stuck_timeout_s`` a task may ask for (30 days, as ``timeout_s``).
STUCK_TIMEOUT_MAX_S = 30 * 86400.0


def progress_pattern_problem(pattern: str) -> str | None:
    """Why ``pattern`` cannot be a progress pattern, or None."""
    if not pattern:
        return "progress_pattern is empty"
    if len(pattern) > PROGRESS_PATTERN_MAX:
        return f"progress_pattern is longer than {PROGRESS_PATTERN_MAX} characters"
    try:
        rx = re.compile(pattern)
    except re.error as exc:
        return f"progress_pattern is not a valid regular expression: {exc}"
    if rx.groups != 1:
        return (
            "progress_pattern needs exactly one capturing group (the number 0-100), "
            f"it has {rx.groups}"
        )
    return None


def compile_progress(pattern: str) -> re.Pattern[str]:
    """The compiled pattern (it was checked at submission)."""
    return re.compile(pattern)


def progress_of(rx: re.Pattern[str], line: str) -> float | None:
    """The progress a line reports, or None (no match, or not a number from 0 to 100)."""
    m = rx.search(line[:PROGRESS_LINE_MAX])
    if m is None:
        return None
    text = m.group(1)
    if text is None:
        return None
    try:
        value = float(text.strip().replace(",", "."))
    except ValueError:
        return None
    if not 0.0 <= value <= 100.0:  # also refuses NaN
        return None
    return value


__all__ = [
    "PROGRESS_LINE_MAX",
    "PROGRESS_PATTERN_MAX",
    "STUCK_TIMEOUT_MAX_S",
    "compile_progress",
    "progress_of",
    "progress_pattern_problem",
]
