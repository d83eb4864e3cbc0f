"""File hashing helpers shared by the client, the CLI and the agent, and the upload of a
submission's missing inputs through its continuation (:class:`InputUploader`)."""

from __future__ import annotations

import errno
import hashlib
import re
import stat
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from herder.api_inputs import JobHeld
    from herder.client.deferral import Continuation

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
            if not stat.S_ISREG(st.st_mode):  # a FIFO would block the read for ever
                raise OSError(errno.EINVAL, "not a regular file", str(path))
            digest = sha256_file(path)
            result[norm] = (digest, st.st_size, st.st_mode & 0o7777)
            where.setdefault(digest, path)
        result[rel] = result[norm]
    return result, where


#: Where the bytes of a submission's inputs are: a file (hashed when it is read),
#: or the bytes themselves.
InputSource = Path | bytes

_BLOB_PATH = re.compile(r"^(?:/api/v1)?/blobs/([0-9a-f]{64})$")
#: Uploads of one submission's missing inputs in flight at once.
UPLOAD_WORKERS = 4


def read_input(digest: str, source: InputSource) -> bytes:
    """The bytes of an input, checked against its digest (a file changed since it was
    hashed is an error, not a wrong input)."""
    from herder.client.errors import HerderClientError

    where = "the bytes given" if isinstance(source, bytes) else str(source)
    try:
        data = source if isinstance(source, bytes) else Path(source).read_bytes()
    except OSError as exc:
        raise HerderClientError(f"{where}: cannot be read: {exc.strerror or exc}") from None
    if sha256_bytes(data) != digest:
        raise HerderClientError(f"{where}: sha256 is not {digest} (changed since it was hashed?)")
    return data


class InputUploader:
    """The ``on_continuation`` hook of a submission sent with ``inputs=later`` (issue 10).

    The master answered the short write (the job exists, waiting) with a
    continuation: ``result`` is a :class:`~herder.api_inputs.JobHeld` naming
    the missing digests, the next request the upload of one of them. The hook
    uploads the others (``put(digest, data)``: through the client's loop, to any
    read-write master; idempotent by digest), then gives the named one's bytes
    as the next request's body: the loop sends it last, to the continuation's
    alternates, and the job is released when the last one is stored.
    """

    def __init__(
        self,
        put: Callable[[str, bytes], object],
        sources: Mapping[str, InputSource],
        *,
        workers: int = UPLOAD_WORKERS,
    ) -> None:
        self._put = put
        self._sources = dict(sources)
        self._workers = max(1, int(workers))
        self.held: JobHeld | None = None
        self.uploaded: list[str] = []  # every digest this hook sent or gave, in order

    def __call__(self, cont: Continuation) -> bytes | None:
        from pydantic import ValidationError

        from herder.api_inputs import JobHeld
        from herder.client.errors import HerderClientError

        try:
            held = JobHeld.model_validate(cont.result)
        except ValidationError as exc:
            raise HerderClientError(
                f"{cont.server}: the continuation of a submission names no held job: {exc}"
            ) from None
        match = _BLOB_PATH.match(cont.path)
        if cont.method != "PUT" or match is None:
            raise HerderClientError(
                f"{cont.server}: job {held.id}: unexpected continuation {cont.method} "
                f"{cont.path} (expected PUT /api/v1/blobs/<digest>)"
            )
        self.held = held
        named = match.group(1)
        wanted = list(dict.fromkeys([*held.missing, named]))
        unknown = [d for d in wanted if d not in self._sources]
        if unknown:
            raise HerderClientError(
                f"job {held.id} waits for blob {unknown[0]}, which this submission has no "
                f"file for ({len(unknown)} such); it fails unless uploaded in time"
            )
        others = [d for d in wanted if d != named]
        if len(others) > 1 and self._workers > 1:
            with ThreadPoolExecutor(min(self._workers, len(others))) as pool:
                # list(): the first upload that fails raises here
                list(pool.map(self._upload, others))
        else:
            for d in others:
                self._upload(d)
        self.uploaded.append(named)
        return read_input(named, self._sources[named])

    def _upload(self, digest: str) -> None:
        self._put(digest, read_input(digest, self._sources[digest]))
        self.uploaded.append(digest)


def input_sources(root: Path, requires: Iterable[tuple[str, str]]) -> dict[str, InputSource]:
    """``{digest: file}`` of a job's required files (``(relpath, digest)``) that exist under
    ``root`` (one that does not may be in the farm's store already: if the master asks
    for it, that is the error). A path leaving ``root`` raises
    :class:`herder.paths.UnsafePath`."""
    from herder.paths import normalize_relpath, resolve_inside

    out: dict[str, InputSource] = {}
    for rel, digest in requires:
        path = resolve_inside(root, normalize_relpath(rel))
        if digest not in out and path.is_file():
            out[digest] = path
    return out
