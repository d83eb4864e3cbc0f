"""One process per state directory: an exclusive ``flock`` on ``<dir>/lock``.

An agent (``herder agent --state-dir``) and the embedded farm of ``herder
run`` (``.herder/``) each keep files a second process on the same directory
would corrupt: the journal, sandboxes it would purge, the saved agent id. The
lock is held for as long as the owner runs and released by the kernel when
the process dies (even ``kill -9``), so a stale lock file never blocks a
restart. The file holds the owner's PID, for the refusal's message only.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

LOCK_NAME = "lock"


class StateDirBusy(Exception):
    """Another process holds the state directory (``directory``; ``pid`` if known)."""

    def __init__(self, directory: Path, lock_path: Path, pid: int | None) -> None:
        holder = f"pid {pid}" if pid is not None else "another process"
        super().__init__(
            f"state directory {directory} is in use by another herder process "
            f"({holder}; lock {lock_path})"
        )
        self.directory = directory
        self.lock_path = lock_path
        self.pid = pid


def _holder(fd: int) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        return int(text) if text.isdigit() else None
    return None


class StateLock:
    """An exclusive, non-blocking ``flock`` on ``<directory>/lock``; :class:`StateDirBusy` if taken.

    ``release()`` (or leaving the ``with`` block) frees it; so does the
    process's end. The directory is created if missing.
    """

    def __init__(self, directory: Path | str, name: str = LOCK_NAME) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / name
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _holder(fd)
            os.close(fd)
            raise StateDirBusy(self.directory, self.path, pid) from None
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            # Empty it first: a reader between our unlock and its own lock sees no stale PID.
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
            with contextlib.suppress(OSError):
                os.close(fd)

    def __enter__(self) -> StateLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


__all__ = ["LOCK_NAME", "StateDirBusy", "StateLock"]
