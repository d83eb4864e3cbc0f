"""Files of the agent: the blob cache, staging copies, log tails, sandbox removal.

- ``BlobCache``: blobs named by sha256 under ``<state_dir>/blobs``, filled on
  demand (the daemon passes the client's ``download_blob``);
- ``clone_file``: the copy staging falls back to when a hard link cannot do
  (reflink, then ``copy_file_range``, then a plain copy);
- ``LogTail``: what a log file gained since the last read, as text;
- ``rmtree_sandbox`` and ``SandboxCleaner``: removing sandboxes (off the
  tasks' critical path, on a background thread).
"""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import logging
import os
import queue
import shutil
import stat
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from herder.agent.outputs import sha256_file

log = logging.getLogger("herder.agent")

FetchBlob = Callable[[str, Path], None]


class StagingError(Exception):
    """The sandbox could not be prepared (infrastructure: disk, blob download, unsafe path)."""


_FICLONE = 0x40049409  # ioctl(dest_fd, FICLONE, src_fd): share the extents (btrfs, XFS)


def clone_file(src: Path | str, dest: Path | str) -> str:
    """Copy ``src`` to a new file ``dest``: reflink, else ``copy_file_range``, else copy.

    Staging uses it where a hard link cannot do (another mode than the cached
    blob's, or another file system). A reflink shares the blocks copy-on-write
    (no data is read or written); ``copy_file_range`` copies inside the kernel
    (and reflinks where the file system can). Returns how: ``"reflink"``,
    ``"copy_file_range"`` or ``"copy"``.
    """
    with open(src, "rb") as fin:
        size = os.fstat(fin.fileno()).st_size
        with open(dest, "wb") as fout:
            try:
                import fcntl

                fcntl.ioctl(fout.fileno(), _FICLONE, fin.fileno())
                return "reflink"
            except (OSError, ImportError):
                pass
            copy_range = getattr(os, "copy_file_range", None)
            if copy_range is not None:
                try:
                    done = 0
                    while done < size:
                        n = copy_range(fin.fileno(), fout.fileno(), size - done)
                        if n == 0:
                            break
                        done += n
                    if done == size:
                        return "copy_file_range"
                except OSError:
                    pass
                fin.seek(0)
                fout.seek(0)
                fout.truncate()
            shutil.copyfileobj(fin, fout, 1 << 20)
            return "copy"


# ----------------------------------------------------------------- blob cache


class BlobCache:
    """A directory of blobs named by sha256, filled on demand by ``fetch``."""

    def __init__(self, root: Path, fetch: FetchBlob | None = None) -> None:
        self.root = Path(root)
        self.fetch = fetch

    def path(self, digest: str) -> Path:
        return self.root / digest[:2] / digest

    def ensure(self, digest: str) -> Path:
        """The cached file for ``digest``, downloading and verifying it if absent."""
        dest = self.path(digest)
        if dest.exists():
            return dest
        if self.fetch is None:
            raise StagingError(f"blob {digest} is not cached and no fetcher is configured")
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.parent / f".{digest}.{uuid.uuid4().hex}.part"
        try:
            self.fetch(digest, tmp)
            got = sha256_file(tmp)
            if got != digest:
                raise StagingError(f"blob {digest} downloaded with wrong digest {got}")
            os.chmod(tmp, 0o644)
            os.replace(tmp, dest)
        except StagingError:
            raise
        except Exception as exc:
            raise StagingError(f"cannot fetch blob {digest}: {exc}") from exc
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        return dest

    def add_verified(self, digest: str, data: bytes) -> bool:
        """Cache ``data`` under ``digest`` if it hashes to it (bytes that came inline)."""
        if hashlib.sha256(data).hexdigest() != digest:
            return False
        self._put(digest, data)
        return True

    def add_bytes(self, data: bytes) -> str:
        """Store ``data``; return its digest (used by tests and direct mode)."""
        digest = hashlib.sha256(data).hexdigest()
        self._put(digest, data)
        return digest

    def _put(self, digest: str, data: bytes) -> None:
        """Write bytes already known to hash to ``digest``, atomically, if absent."""
        dest = self.path(digest)
        if not dest.exists():
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.parent / f".{digest}.{uuid.uuid4().hex}.part"
            tmp.write_bytes(data)
            os.chmod(tmp, 0o644)
            os.replace(tmp, dest)


# ------------------------------------------------------------------ log tails

_LOG_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def open_log(path: Path | str) -> BinaryIO | None:
    """A sandbox's log file opened for reading; None when it is no regular file now.

    The command runs next to its log files and can replace one with a symlink
    (to /etc/shadow: the agent would ship it as the log), a FIFO (an open
    that never returns) or a device: never followed, never opened blocking.
    """
    try:
        fd = os.open(path, _LOG_READ)
    except OSError:
        return None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return None
    return os.fdopen(fd, "rb")


def append_log(path: Path | str, data: bytes) -> None:
    """Append to a sandbox's log file, never through a symlink nor into a FIFO."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except OSError:
        return
    try:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            os.write(fd, data)
    except OSError:
        pass
    finally:
        os.close(fd)


class LogTail:
    """Reads what a log file gained since the last read, as text.

    One incremental UTF-8 decoder per stream keeps a multi-byte character that
    straddles two reads whole; invalid bytes become U+FFFD.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = path
        self.offset = 0
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def read(self, limit: int, final: bool = False) -> tuple[str, bool]:
        """(new text, more bytes remain). ``final`` flushes the decoder at EOF."""
        data = b""
        try:
            # lstat: the size of a symlink the command put there is not its target's
            if os.lstat(self.path).st_size > self.offset:  # the common case: nothing new
                fh = open_log(self.path)
                if fh is not None:
                    with fh:
                        fh.seek(self.offset)
                        data = fh.read(limit + 1)
        except OSError:
            pass
        more = len(data) > limit
        data = data[:limit]
        self.offset += len(data)
        text = self._decoder.decode(data, final=final and not more)
        return text, more


def rmtree_sandbox(path: Path) -> None:
    def onerror(func: Callable[..., object], p: str, _exc: object) -> None:
        # a read-only directory left by the command: make it writable, retry once
        with contextlib.suppress(OSError):
            os.chmod(os.path.dirname(p), 0o700)
            if os.path.isdir(p) and not os.path.islink(p):
                os.chmod(p, 0o700)
                shutil.rmtree(p, ignore_errors=True)
            else:
                func(p)

    if os.path.lexists(path):
        shutil.rmtree(path, onerror=onerror)


class SandboxCleaner:
    """Removes sandboxes on a background thread, off the tasks' critical path.

    Started on first use; :meth:`flush` waits until everything queued is gone.
    """

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[Path | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._pending = 0
        self._idle = threading.Condition(self._lock)

    def put(self, path: Path) -> None:
        with self._lock:
            self._pending += 1
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="herder-cleaner", daemon=True
                )
                self._thread.start()
        self._queue.put(path)

    def _run(self) -> None:
        while True:
            path = self._queue.get()
            if path is None:
                return
            try:
                rmtree_sandbox(path)
            except OSError as exc:
                log.warning("event=cleanup_failed path=%s error=%r", path, str(exc))
            finally:
                with self._idle:
                    self._pending -= 1
                    if self._pending == 0:
                        self._idle.notify_all()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until the queue is empty; False on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout)

    @property
    def pending(self) -> int:
        return self._pending


__all__ = [
    "BlobCache",
    "FetchBlob",
    "LogTail",
    "SandboxCleaner",
    "append_log",
    "open_log",
    "StagingError",
    "clone_file",
    "rmtree_sandbox",
]
