"""What a command produced: snapshot the sandbox before, diff it after.

A file is an output when it is new or when its (inode, size, mtime_ns)
changed. ctime is deliberately not compared: hard-linking the same cached
blob into another sandbox (or removing one) changes the inode's ctime without
anyone writing to the file.

Whatever the command leaves, collecting it never raises and never hangs:
only regular files are opened (not FIFOs or devices), symlinks leading out
of the sandbox are skipped, and what can never be brought back (a name that
is not UTF-8 or holds a control character or backslash, more than
``OUTPUTS_MAX`` files, a declared output missing or unsafe) becomes a
*problem*: the attempt fails with that reason, alone.
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from herder.api_models import OUTPUTS_MAX, OutputFile
from herder.names import name_problem
from herder.paths import UnsafePath, resolve_inside

FileKey = tuple[int, int, int]  # (inode, size, mtime_ns)
Snapshot = dict[str, FileKey]


def _key(st: os.stat_result) -> FileKey:
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def snapshot(root: Path) -> Snapshot:
    """Every regular file (and symlink) under ``root``, by relative path."""
    snap: Snapshot = {}
    root_s = str(root)
    for dirpath, _dirnames, filenames in os.walk(root_s):
        rel_dir = os.path.relpath(dirpath, root_s)
        for name in filenames:
            full = os.path.join(dirpath, name)
            try:
                st = os.lstat(full)
            except OSError:
                continue
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            snap[rel.replace(os.sep, "/")] = _key(st)
    return snap


def sha256_file(path: Path | str) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


@dataclass
class Collected:
    files: list[tuple[OutputFile, Path]] = field(default_factory=list)
    # Why the outputs cannot be brought back as asked: a name no store can
    # hold, too many files, a declared output missing or unsafe. Any of them
    # fails the attempt (a command failure: another agent would get the same).
    problems: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # undeclared files left out (symlink escape)
    hidden: int = 0  # problems beyond PROBLEMS_SHOWN, counted only

    def problem(self, text: str) -> None:
        if len(self.problems) < PROBLEMS_SHOWN:
            self.problems.append(text)
        else:
            self.hidden += 1

    @property
    def error(self) -> str | None:
        if not self.problems:
            return None
        more = f"; and {self.hidden} more" if self.hidden else ""
        return "; ".join(self.problems) + more


PROBLEMS_SHOWN = 10  # the first few explain it; a million bad names would not fit an error


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def _describe(root_real: str, rel: str, full: str) -> tuple[OutputFile, Path] | str | None:
    """An output entry for ``full``; a problem string; or None (not a regular file).

    Never opens anything but a regular file (a FIFO would block, a device
    would never end).
    """
    st = os.lstat(full)
    target = full
    if stat.S_ISLNK(st.st_mode):
        real = os.path.realpath(full)
        if real != root_real and not real.startswith(root_real + os.sep):
            return f"{rel}: symlink points outside the sandbox (skipped)"
        try:
            st = os.stat(real)
        except OSError:
            return f"{rel}: dangling symlink (skipped)"
        target = real
    if not stat.S_ISREG(st.st_mode):
        return None
    # O_NONBLOCK, O_NOFOLLOW and fstat: a process that outlived the command
    # cannot swap in a FIFO or a symlink between the stat and the read.
    fd = os.open(target, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    with open(fd, "rb") as fh:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None
        digest = hashlib.file_digest(fh, "sha256").hexdigest()
    # The name was checked by the caller: skip re-validating it.
    of = OutputFile.model_construct(
        path=rel, digest=digest, size=st.st_size, mode=stat.S_IMODE(st.st_mode) & 0o777
    )
    return of, Path(target)


def _short(rel: str) -> str:
    """A name for a message: quoted and escaped, at most about 200 characters."""
    return repr(rel) if len(rel) <= 200 else f"{rel[:100]!r}…{rel[-100:]!r}"


def _walk(top: str, root_real: str, out: Collected, limit: int) -> list[tuple[str, str]]:
    """(relative name, full path) of every file under ``top`` (sorted), names checked.

    A name that can never be stored is a problem; past ``limit`` files the
    walk stops with a problem (and nothing is hashed).
    """
    found: list[tuple[str, str]] = []

    def unlistable(exc: OSError) -> None:  # e.g. nested past PATH_MAX, or mode 000
        where = os.path.relpath(str(exc.filename or top), root_real)
        out.problem(f"cannot list outputs in {_short(where)}: {exc.strerror or exc}")

    for dirpath, dirnames, filenames in os.walk(top, onerror=unlistable):
        dirnames.sort()
        rel_dir = os.path.relpath(dirpath, root_real)
        for name in sorted(filenames):
            rel = (name if rel_dir == "." else f"{rel_dir}/{name}").replace(os.sep, "/")
            problem = name_problem(rel)
            if problem is None and "\\" in rel:  # POSIX allows it; a job path never has one
                problem = f"contains a backslash: {rel!r}"
            if problem is not None:
                out.problem(f"output name {problem}")
                continue
            found.append((rel, os.path.join(dirpath, name)))
            if len(found) > limit:
                out.problem(f"the command left more than {limit} output files")
                return []
    return found


def collect(
    work: Path,
    before: Snapshot,
    listed: list[str] | None,
    root_real: str | None = None,
    limit: int = OUTPUTS_MAX,
) -> Collected:
    """Outputs of a finished command in ``work``; never raises for what the command left.

    ``listed`` None: every file created or changed since ``before``. Otherwise
    exactly those paths (a directory: every file under it); a missing one is a
    problem. ``root_real`` is ``realpath(work)`` when the caller knows it
    already. At most ``limit`` files (OUTPUTS_MAX: what a completion may list).
    """
    out = Collected()
    if root_real is None:
        root_real = os.path.realpath(work)
    try:
        if listed is None:
            for rel, full in _walk(root_real, root_real, out, limit):
                try:
                    if before.get(rel) == _key(os.lstat(full)):
                        continue
                except OSError:
                    continue
                _add(out, root_real, rel, full, declared=False)
            return out
        for rel in listed:
            path = _declared(work, rel, out)
            if path is None:
                continue
            if os.path.isdir(path) and not os.path.islink(path):
                for r, f in _walk(path, root_real, out, limit - len(out.files)):
                    _add(out, root_real, r, f, declared=False)
            else:
                _add(out, root_real, rel, path, declared=True)
    except OSError as exc:
        out.problem(f"cannot list outputs: {exc.strerror or exc}")
    return out


def _add(out: Collected, root_real: str, rel: str, full: str, declared: bool) -> None:
    """Describe one candidate into ``out``: a file, a problem, or (undeclared) skipped."""
    try:
        got = _describe(root_real, rel, full)
    except OSError as exc:
        out.problem(f"{rel}: cannot read output: {exc.strerror or exc}")
        return
    if isinstance(got, tuple):
        out.files.append(got)
    elif not declared:
        if got is not None:
            out.skipped.append(got)
    elif got is None:
        try:
            kind = _kind(os.stat(full).st_mode)
        except OSError as exc:
            kind = exc.strerror or str(exc)
        out.problem(f"{rel}: declared output is {kind}")
    else:
        out.problem(got)


def _declared(work: Path, rel: str, out: Collected) -> str | None:
    try:
        path = resolve_inside(work, rel)
    except UnsafePath as exc:
        out.problem(str(exc))
        return None
    if not os.path.lexists(path):
        out.problem(f"{rel}: declared output was not produced")
        return None
    return str(path)
