"""Job-root-relative paths: they never leave the sandbox (DESIGN §11)."""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath


class UnsafePath(ValueError):
    """A path that would escape its root, or is not a plain relative path."""


def normalize_relpath(path: str) -> str:
    """Return the canonical form of a job-relative path, or raise UnsafePath.

    ``./src/a.c`` becomes ``src/a.c``. Absolute paths, ``..`` components,
    empty paths, NUL bytes and backslashes are refused.
    """
    if not isinstance(path, str) or not path.strip():
        raise UnsafePath("path is empty")
    if "\x00" in path:
        raise UnsafePath(f"path {path!r} contains a NUL byte")
    if "\\" in path:
        raise UnsafePath(f"path {path!r} contains a backslash; use '/'")
    if path.startswith("/"):
        raise UnsafePath(f"path {path!r} is absolute; paths are relative to the job root")
    parts = [p for p in PurePosixPath(path).parts if p not in ("", ".")]
    if not parts:
        raise UnsafePath(f"path {path!r} names the job root itself, not a file")
    if ".." in parts:
        raise UnsafePath(f"path {path!r} contains '..'; paths must stay inside the job root")
    return "/".join(parts)


def resolve_inside(root: Path | str, relpath: str, *, root_real: str | None = None) -> Path:
    """Join ``relpath`` to ``root`` and check no symlink on the way escapes it.

    ``root_real``: ``os.path.realpath(root)`` computed already by a caller that
    knows ``root`` cannot have moved since (a sandbox before its command runs),
    which spares a path walk per file.
    """
    rel = normalize_relpath(relpath)
    real = Path(root_real if root_real is not None else os.path.realpath(root))
    parts = rel.split("/")
    target = real.joinpath(*parts)
    if len(parts) > 1:
        # realpath of the parent catches symlinked directories pointing outside
        # (a file directly in the root has the root, resolved above, as parent).
        parent_real = Path(os.path.realpath(target.parent))
        if parent_real != real and real not in parent_real.parents:
            raise UnsafePath(f"path {relpath!r} escapes the job root through a symlink")
    if target.is_symlink():
        dest = Path(os.path.realpath(target))
        if dest != real and real not in dest.parents:
            raise UnsafePath(f"path {relpath!r} is a symlink that points outside the job root")
    return target
