"""File names no store can hold: what the agent refuses to bring back, what a job may not name.

Separate from ``herder.paths`` (which keeps paths inside their root): a name
can be perfectly safe there and still impossible to carry, as JSON text
(a POSIX name that is not UTF-8), in a log line or on a user's terminal (a
newline, an escape sequence), or at all (longer than PATH_MAX).
"""

from __future__ import annotations

import re

#: The longest job-relative path stored (Linux PATH_MAX), in UTF-8 bytes.
PATH_MAX_BYTES = 4096
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")  # C0, DEL and C1 control characters


def name_problem(path: str) -> str | None:
    """Why ``path`` can never be stored as a file name, or None.

    Not UTF-8 (a surrogate-escaped byte of a POSIX name), a control
    character, longer than PATH_MAX_BYTES. The text is printable (``repr``
    escapes), e.g. ``is not valid UTF-8: 'out/\\udcff' (bytes b'out/\\xff')``.
    """
    try:
        size = len(path.encode("utf-8"))
    except UnicodeEncodeError:
        try:
            raw = f" (bytes {path.encode('utf-8', 'surrogateescape')!r})"
        except UnicodeEncodeError:
            raw = ""  # a surrogate no file name decodes to
        return f"is not valid UTF-8: {path!r}{raw}"
    bad = _CONTROL.search(path)
    if bad is not None:
        return f"contains a control character {bad.group()!r}: {path!r}"
    if size > PATH_MAX_BYTES:
        return f"is longer than {PATH_MAX_BYTES} bytes ({size}): {path[:80]!r}…"
    return None


__all__ = ["PATH_MAX_BYTES", "name_problem"]
