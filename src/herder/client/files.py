"""File hashing helpers shared by the client, the CLI and the agent."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

CHUNK = 1 << 20


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path | str) -> str:
    """Hex sha256 of a file's content, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def hash_files(
    root: Path, relpaths: Iterable[str]
) -> tuple[dict[str, tuple[str, int, int]], dict[str, Path]]:
    """Hash files under ``root``: ``({relpath: (digest, size, mode)}, {digest: path})``.

    Each path is a key as given and in its normalized form (``./src/a.c`` and
    ``src/a.c``). Paths that would leave ``root`` raise
    :class:`herder.paths.UnsafePath`.
    """
    from herder.paths import normalize_relpath, resolve_inside

    result: dict[str, tuple[str, int, int]] = {}
    where: dict[str, Path] = {}
    for rel in relpaths:
        norm = normalize_relpath(rel)
        if norm not in result:
            path = resolve_inside(root, norm)
            st = path.stat()
            digest = sha256_file(path)
            result[norm] = (digest, st.st_size, st.st_mode & 0o7777)
            where.setdefault(digest, path)
        result[rel] = result[norm]
    return result, where
