"""Content-addressed blobs (sha256), and the small ones that travel inline."""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from herder.api_models import (
    INLINE_REQUIRE_MAX,
)
from herder.errors import NotFound
from herder.store.common import (
    _BLOB_QUERY_BATCH,
    _check_digest,
)
from herder.store.schema import (
    blobs,
)
from herder.store.tx import StoreBase, _Tx


class BlobsMixin(StoreBase):
    """Part of :class:`herder.store.Store`: blobs."""

    def _small_blobs(self, t: _Tx, digests: set[str]) -> dict[str, bytes]:
        """The bytes of those of ``digests`` small enough to travel in an offer."""
        if not digests:
            return {}
        wanted = sorted(digests)
        found: dict[str, bytes] = {}
        for i in range(0, len(wanted), _BLOB_QUERY_BATCH):
            for digest, data in t.conn.execute(
                sa.select(blobs.c.digest, blobs.c.data).where(
                    blobs.c.digest.in_(wanted[i : i + _BLOB_QUERY_BATCH]),
                    blobs.c.size <= INLINE_REQUIRE_MAX,
                )
            ):
                found[digest] = bytes(data)
        return found

    def _insert_blobs(self, t: _Tx, found: dict[str, bytes]) -> None:
        """Store verified blobs in the caller's transaction; known ones are left as they are."""
        rows = [
            {"digest": d, "size": len(data), "data": data, "created_at": t.now}
            for d, data in found.items()
        ]
        t.conn.execute(self._insert_ignore(blobs), rows)

    def missing_blobs(self, digests: Sequence[str]) -> list[str]:
        wanted = list(dict.fromkeys(digests))

        def q(conn: Connection) -> list[str]:
            have: set[str] = set()
            for i in range(0, len(wanted), _BLOB_QUERY_BATCH):
                batch = wanted[i : i + _BLOB_QUERY_BATCH]
                have.update(
                    conn.execute(
                        sa.select(blobs.c.digest).where(blobs.c.digest.in_(batch))
                    ).scalars()
                )
            return [d for d in wanted if d not in have]

        return self._read(q) if wanted else []

    def put_blob(self, digest: str, data: bytes) -> tuple[int, bool]:
        """Store a blob under its sha256; ``(size, created)``. Raises DigestMismatch."""
        actual = _check_digest(digest, data)
        if not self.missing_blobs([actual]):
            return len(data), False

        def tx(t: _Tx) -> bool:
            ins = self._insert_ignore(blobs).values(
                digest=actual, size=len(data), data=data, created_at=t.now
            )
            return t.conn.execute(ins.returning(blobs.c.digest)).first() is not None

        return len(data), self._write(tx)

    def get_blob(self, digest: str) -> bytes:
        data = self._read(
            lambda c: c.execute(sa.select(blobs.c.data).where(blobs.c.digest == digest)).scalar()
        )
        if data is None:
            raise NotFound(f"blob {digest} not found")
        return bytes(data)

    def has_blob(self, digest: str) -> bool:
        return not self.missing_blobs([digest])
