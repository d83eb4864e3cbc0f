"""What a command produced: snapshot the sandbox before, diff it after.

A file is an output when it is new or when its (inode, size, mtime_ns)
changed. ctime is deliberately not compared: hard-linking the same cached
blob into another sandbox (or removing one) changes the inode's ctime without
anyone writing to the file.
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from herder.api_models import OutputFile
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
    problems: list[str] = field(default_factory=list)  # declared outputs missing or unsafe
    skipped: list[str] = field(default_factory=list)  # undeclared files left out (symlink escape)


def _describe(root_real: str, rel: str, full: str) -> tuple[OutputFile, Path] | str | None:
    """An output entry for ``full``; a problem string; or None to skip silently."""
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
    digest = sha256_file(target)
    of = OutputFile(path=rel, digest=digest, size=st.st_size, mode=stat.S_IMODE(st.st_mode) & 0o777)
    return of, Path(target)


def collect(
    work: Path, before: Snapshot, listed: list[str] | None, root_real: str | None = None
) -> Collected:
    """Outputs of a finished command in ``work``.

    ``listed`` None: every file created or changed since ``before``. Otherwise
    exactly those paths; a missing one is a problem, never an exception.
    ``root_real`` is ``realpath(work)`` when the caller knows it already.
    """
    out = Collected()
    if root_real is None:
        root_real = os.path.realpath(work)
    if listed is not None:
        for rel in listed:
            try:
                path = resolve_inside(work, rel)
            except UnsafePath as exc:
                out.problems.append(str(exc))
                continue
            if not os.path.lexists(path):
                out.problems.append(f"{rel}: declared output was not produced")
                continue
            try:
                got = _describe(root_real, rel, str(path))
            except OSError as exc:
                out.problems.append(f"{rel}: {exc.strerror or exc}")
                continue
            if got is None:
                out.problems.append(f"{rel}: not a regular file")
            elif isinstance(got, str):
                out.problems.append(got)
            else:
                out.files.append(got)
        return out

    for dirpath, dirnames, filenames in os.walk(root_real):
        dirnames.sort()
        rel_dir = os.path.relpath(dirpath, root_real)
        for name in sorted(filenames):
            full = os.path.join(dirpath, name)
            rel = (name if rel_dir == "." else f"{rel_dir}/{name}").replace(os.sep, "/")
            try:
                st = os.lstat(full)
            except OSError:
                continue
            if before.get(rel) == _key(st):
                continue
            try:
                got = _describe(root_real, rel, full)
            except OSError as exc:
                out.problems.append(f"{rel}: {exc.strerror or exc}")
                continue
            if isinstance(got, str):
                out.skipped.append(got)
            elif got is not None:
                out.files.append(got)
    return out
