"""Files a job is read from on the submitting machine: the job file itself and its ``requires``.

Both are checked before anything is sent, so a bad one is one clear line and
nothing is submitted (DESIGN §11):

- A job file (Rakefile, TOML or JSON) must be a regular, readable file of at
  most :data:`MAX_SOURCE_BYTES` (the master's JSON body limit: a bigger job
  could not be submitted anyway). It is opened without blocking, so a FIFO
  or a device is refused instead of hanging or reading forever.
- A required path must name a regular, readable file inside the project
  directory *after resolving symlinks*. A symlink inside the project to a
  file inside the project is allowed (it is what the file's content is read
  from); one that resolves outside it (``data -> /etc/passwd``, or a
  symlinked directory on the way) is refused, as are directories, FIFOs,
  devices, sockets and dangling links.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from herder.api_limits import MAX_BODY_BYTES

__all__ = [
    "MAX_SOURCE_BYTES",
    "BadEncoding",
    "SourceProblem",
    "decode_utf8",
    "read_source",
    "required_file_problem",
]

MAX_SOURCE_BYTES = MAX_BODY_BYTES
"""The largest job file read (Rakefile, TOML or JSON), in bytes."""


class SourceProblem(Exception):
    """A job file that cannot be read; ``str()`` says why (without the path)."""


class BadEncoding(SourceProblem):
    """A job file that is not UTF-8 text: at ``line``, ``col`` (1-based, in characters)."""

    def __init__(self, message: str, line: int, col: int) -> None:
        super().__init__(message)
        self.line = line
        self.col = col


def decode_utf8(data: bytes) -> str:
    """Strict UTF-8; :class:`BadEncoding` at the first invalid byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        start = data.rfind(b"\n", 0, exc.start) + 1
        col = len(data[start : exc.start].decode("utf-8", errors="replace")) + 1
        raise BadEncoding(
            f"invalid UTF-8 byte 0x{data[exc.start]:02x}; a job file must be UTF-8 text", line, col
        ) from None


def _kind(mode: int) -> str | None:
    """What a non-regular file is, for a message; None for a regular file."""
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def _os_problem(exc: OSError) -> str:
    if exc.errno in (errno.ENOENT, errno.ENOTDIR):
        return "does not exist"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "cannot be read: permission denied"
    if exc.errno == errno.ELOOP:
        return "is a symlink loop"
    return f"cannot be read: {exc.strerror or exc}"


def read_source(path: Path | str) -> bytes:
    """The bytes of a job file; :class:`SourceProblem` if it is not one."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except IsADirectoryError:
        raise SourceProblem("is a directory, not a file") from None
    except OSError as exc:
        raise SourceProblem(_os_problem(exc)) from None
    st = os.fstat(fd)
    kind = _kind(st.st_mode)
    if kind is not None:
        os.close(fd)
        raise SourceProblem(f"is {kind}, not a regular file")
    with os.fdopen(fd, "rb") as f:
        if st.st_size > MAX_SOURCE_BYTES:
            raise SourceProblem(
                f"is {st.st_size} bytes; a job file may have at most {MAX_SOURCE_BYTES}"
            )
        try:
            data = f.read(MAX_SOURCE_BYTES + 1)  # it may grow while it is read
        except OSError as exc:
            raise SourceProblem(_os_problem(exc)) from None
    if len(data) > MAX_SOURCE_BYTES:
        raise SourceProblem(
            f"is larger than {MAX_SOURCE_BYTES} bytes, the most a job file may have"
        )
    return data


def required_file_problem(root: Path, rel: str) -> str | None:
    """Why the required ``rel`` (already normalised) cannot be sent from ``root``, or None.

    The message starts with the path, e.g. ``'data.txt' is a directory ...``.
    """
    root_real = Path(os.path.realpath(root))
    target = root_real.joinpath(*rel.split("/"))
    real = Path(os.path.realpath(target))
    if real != root_real and root_real not in real.parents:
        return (
            f"required file {rel!r} resolves to {str(real)!r}, outside the project "
            f"directory {str(root_real)!r} (through a symlink)"
        )
    try:
        st = os.stat(real)
    except OSError as exc:
        problem = _os_problem(exc)
        if problem == "does not exist" and target.is_symlink():
            problem = "is a dangling symlink"
        where = f" in {str(root_real)!r}" if problem == "does not exist" else ""
        return f"required file {rel!r} {problem}{where}"
    kind = _kind(st.st_mode)
    if kind is not None:
        return f"required file {rel!r} is {kind}, not a regular file"
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        return f"required file {rel!r} {_os_problem(exc)}"
    os.close(fd)
    return None
