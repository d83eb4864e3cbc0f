"""Content-addressed blobs (sha256), and the small ones that travel inline.

A blob's ``created_at`` is when it was stored or, at most an hour stale, when
a client was last told the store has it (``missing_blobs``, ``put_blob``, an
inline blob stored again): a client that skips an upload because the blob is
there submits the job that references it soon after, and the collector
(herder.store.retention) keeps every blob younger than its grace period.
"""

from __future__ import annotations

import sqlite3
import struct
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, BinaryIO

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from herder.api_models import (
    INLINE_REQUIRE_MAX,
)
from herder.errors import HerderError, NotFound
from herder.store.common import (
    _BLOB_QUERY_BATCH,
    _check_digest,
)
from herder.store.schema import (
    blobs,
)
from herder.store.tx import StoreBase, _Tx

# How stale a blob's created_at may get before a client's look-up refreshes it
# (a write); the collector's grace (hours) must be well above it.
BLOB_TOUCH_AFTER_S = 3600.0


class BlobsMixin(StoreBase):
    """Part of :class:`herder.store.Store`: blobs."""

    if TYPE_CHECKING:  # herder.store.inputs: an upload releases the jobs held for it

        def _inputs_arrived(self, t: _Tx, digest: str) -> list[int]: ...
        def _inputs_present(self, digest: str) -> list[int]: ...

    def _small_blobs(self, t: _Tx, digests: set[str]) -> dict[str, bytes]:
        """The bytes of those of ``digests`` small enough to travel in an offer."""
        if not digests:
            return {}
        sql, wanted = self._sql, sorted(digests)
        found: dict[str, bytes] = {}
        for i in range(0, len(wanted), _BLOB_QUERY_BATCH):
            batch = wanted[i : i + _BLOB_QUERY_BATCH]
            for digest, data in t.cur.execute(
                sql.small_blobs(len(batch)), [*batch, INLINE_REQUIRE_MAX]
            ):
                found[digest] = bytes(data)
        return found

    def _insert_blobs(self, t: _Tx, found: dict[str, bytes]) -> None:
        """Store verified blobs in the caller's transaction; known ones are left as they are.

        Unless stale: then the completion that references them refreshes their
        grace (a collector may be looking at them).
        """
        if not found:
            return
        sql = self._sql
        stale_before = sql.ts(t.now - timedelta(seconds=BLOB_TOUCH_AFTER_S))
        items = sorted(found.items())  # one lock order for concurrent writers (PostgreSQL)
        for i in range(0, len(items), _BLOB_QUERY_BATCH):
            sql.insert_blobs(t.cur, t.at, stale_before, items[i : i + _BLOB_QUERY_BATCH])

    def missing_blobs(self, digests: Sequence[str]) -> list[str]:
        """Those of ``digests`` the store lacks; the others' grace is refreshed if stale.

        The refresh is a compare-and-set in its own write: a blob the collector
        deleted meanwhile is not refreshed, and is reported missing.
        """
        wanted = list(dict.fromkeys(digests))
        if not wanted:
            return []

        def q(conn: Connection) -> tuple[dict[str, datetime], datetime]:
            have: dict[str, datetime] = {}
            for i in range(0, len(wanted), _BLOB_QUERY_BATCH):
                batch = wanted[i : i + _BLOB_QUERY_BATCH]
                for digest, at in conn.execute(
                    sa.select(blobs.c.digest, blobs.c.created_at).where(blobs.c.digest.in_(batch))
                ):
                    have[digest] = at
            return have, self._now_fn(conn)

        have, now = self._read(q)
        stale_before = now - timedelta(seconds=BLOB_TOUCH_AFTER_S)
        stale = sorted(d for d, at in have.items() if at < stale_before)
        if stale:
            kept = self._write(lambda t: self._touch_blobs(t, stale))
            for d in stale:
                if d not in kept:
                    del have[d]
        return [d for d in wanted if d not in have]

    def _touch_blobs(self, t: _Tx, digests: Sequence[str]) -> set[str]:
        """Refresh the grace of existing blobs; the digests still there."""
        kept: set[str] = set()
        for i in range(0, len(digests), _BLOB_QUERY_BATCH):
            kept.update(
                t.conn.execute(
                    sa.update(blobs)
                    .where(blobs.c.digest.in_(digests[i : i + _BLOB_QUERY_BATCH]))
                    .values(created_at=t.now)
                    .returning(blobs.c.digest)
                ).scalars()
            )
        return kept

    def put_blob(self, digest: str, data: bytes) -> tuple[int, bool]:
        """Store a blob under its sha256; ``(size, created)``. Raises DigestMismatch."""
        actual = _check_digest(digest, data)
        if not self.missing_blobs([actual]):
            self._inputs_present(actual)
            return len(data), False

        def tx(t: _Tx) -> bool:
            ins = self._insert_ignore(blobs).values(
                digest=actual, size=len(data), data=data, created_at=t.now
            )
            created = t.conn.execute(ins.returning(blobs.c.digest)).first() is not None
            self._inputs_arrived(t, actual)  # same transaction: held jobs see it at once
            return created

        return len(data), self._write(tx)

    def put_blob_file(self, digest: str, path: str, size: int) -> tuple[int, bool]:
        """Store the verified file at ``path`` (``size`` bytes, sha256 ``digest``)
        as a blob; ``(size, created)``.

        Streamed into the database in chunks, never read whole: SQLite writes
        into a zeroblob through its incremental blob I/O, PostgreSQL receives
        the bytes through COPY. The caller has checked the digest.
        """
        if not self.missing_blobs([digest]):
            self._inputs_present(digest)
            return size, False

        def tx(t: _Tx) -> bool:
            with open(path, "rb") as f:
                if self._is_pg:
                    created = _copy_blob_pg(t, digest, size, f)
                else:
                    created = _write_blob_sqlite(t, digest, size, f)
            self._inputs_arrived(t, digest)  # same transaction: held jobs see it at once
            return created

        return size, self._write(tx)

    def get_blob(self, digest: str) -> bytes:
        data = self._read(
            lambda c: c.execute(sa.select(blobs.c.data).where(blobs.c.digest == digest)).scalar()
        )
        if data is None:
            raise NotFound(f"blob {digest} not found")
        return bytes(data)

    def has_blob(self, digest: str) -> bool:
        return not self.missing_blobs([digest])


#: Bytes per chunk a blob upload is written to the database in.
BLOB_CHUNK = 1 << 20


class BlobTooLarge(HerderError):
    code = "too_large"
    status = 413


def _write_blob_sqlite(t: _Tx, digest: str, size: int, f: BinaryIO) -> bool:
    conn = t.conn.connection.driver_connection
    # SQLite's own bound on a row (SQLITE_MAX_LENGTH, 1e9 bytes by default) is
    # below the master's default blob bound (1 GiB): refused, not a driver error.
    limit = conn.getlimit(sqlite3.SQLITE_LIMIT_LENGTH) - 4096  # type: ignore[union-attr]
    if size > limit:
        raise BlobTooLarge(f"blob of {size} bytes: this SQLite store holds at most {limit}")
    row = t.cur.execute(
        "INSERT INTO blobs (digest, size, data, created_at) VALUES (?, ?, zeroblob(?), ?) "
        "ON CONFLICT (digest) DO NOTHING RETURNING rowid",
        (digest, size, size, t.at),
    ).fetchone()
    if row is None:  # stored meanwhile by another upload
        return False
    if size:
        with conn.blobopen("blobs", "data", row[0]) as blob:  # type: ignore[union-attr]
            while chunk := f.read(BLOB_CHUNK):
                blob.write(chunk)
    return True


#: The most one PostgreSQL bytea value holds, with a margin: a field is at most
#: 1 GiB - 1 bytes in all (MaxAllocSize), below the master's default blob bound.
PG_BLOB_MAX = (1 << 30) - (1 << 20)


def _copy_blob_pg(t: _Tx, digest: str, size: int, f: BinaryIO) -> bool:
    # Past PG_BLOB_MAX the server's COPY fails ("out of memory"): refused, not a
    # driver error (a 500).
    if size > PG_BLOB_MAX:
        raise BlobTooLarge(
            f"blob of {size} bytes: this PostgreSQL store holds at most {PG_BLOB_MAX}"
        )
    # COPY cannot skip a known key: the bytes go to a temporary table, then
    # into blobs with ON CONFLICT, both on the server.
    t.cur.execute("CREATE TEMPORARY TABLE herder_blob_upload (data bytea) ON COMMIT DROP")
    with t.cur.copy("COPY herder_blob_upload (data) FROM STDIN (FORMAT binary)") as copy:
        # One row of one field: header, field count, length, the raw bytes, trailer.
        copy.write(b"PGCOPY\n\xff\r\n\x00" + struct.pack("!iihi", 0, 0, 1, size))
        while chunk := f.read(BLOB_CHUNK):
            copy.write(chunk)
        copy.write(struct.pack("!h", -1))
    t.cur.execute(
        "INSERT INTO blobs (digest, size, data, created_at) "
        "SELECT %s, %s, data, %s FROM herder_blob_upload "
        "ON CONFLICT (digest) DO NOTHING RETURNING digest",
        (digest, size, t.at),
    )
    return t.cur.fetchone() is not None
