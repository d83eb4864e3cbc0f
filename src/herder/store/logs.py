"""Events and logs: the event history, attempts' streamed output."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from herder.api_models import (
    EventView,
    LogChunk,
    LogView,
)
from herder.errors import InvalidRequest, NotFound, StaleAttempt
from herder.store import views
from herder.store.common import (
    _ACTIVE,
    _merge_chunks,
)
from herder.store.schema import (
    attempts,
    events,
    jobs,
    log_chunks,
    tasks,
)
from herder.store.tx import StoreBase, _Tx


class LogsMixin(StoreBase):
    """Part of :class:`herder.store.Store`: events and logs."""

    def list_events(
        self,
        job_id: int | None = None,
        task_id: int | None = None,
        after_id: int = 0,
        limit: int = 1000,
        *,
        job_must_exist: bool = False,
    ) -> list[EventView]:
        """Events by id; ``job_must_exist``: NotFound for an unknown ``job_id`` (same read)."""

        def q(conn: Connection) -> list[EventView]:
            # A followed job is polled often: check it exists by its key, not its view.
            if (
                job_must_exist
                and job_id is not None
                and conn.execute(sa.select(jobs.c.id).where(jobs.c.id == job_id)).first() is None
            ):
                raise NotFound(f"job {job_id} not found")
            stmt = sa.select(events).where(events.c.id > after_id)
            if job_id is not None:
                stmt = stmt.where(events.c.job_id == job_id)
            if task_id is not None:
                stmt = stmt.where(events.c.task_id == task_id)
            rows = conn.execute(stmt.order_by(events.c.id).limit(limit)).all()
            return [views.event_view(r) for r in rows]

        return self._read(q)

    def _insert_log(self, t: _Tx, attempt_id: int, merged: dict[str, str], lens: Any) -> None:
        """Chunks of ``merged`` ending at ``lens`` = (stdout_len, stderr_len) after the append."""
        if not merged:
            return
        rows = []
        for stream, data in merged.items():
            end = lens[0] if stream == "stdout" else lens[1]
            rows.append((attempt_id, stream, end - len(data), end, data))
        t.cur.executemany(self._sql.insert_log, rows)

    def append_log(self, attempt_id: int, token: str, chunks: Sequence[LogChunk]) -> None:
        """Append streamed output of a running attempt. Raises StaleAttempt if not current."""
        merged = _merge_chunks(chunks)

        def tx(t: _Tx) -> None:
            current_task = sa.exists().where(
                tasks.c.id == attempts.c.task_id,
                tasks.c.attempt_count == attempts.c.number,
                tasks.c.state.in_(_ACTIVE),
            )
            lens = t.conn.execute(
                sa.update(attempts)
                .where(
                    attempts.c.id == attempt_id,
                    attempts.c.token == token,
                    attempts.c.state.in_(_ACTIVE),
                    current_task,
                )
                .values(
                    stdout_len=attempts.c.stdout_len + len(merged.get("stdout", "")),
                    stderr_len=attempts.c.stderr_len + len(merged.get("stderr", "")),
                )
                .returning(attempts.c.stdout_len, attempts.c.stderr_len)
            ).first()
            if lens is None:
                raise StaleAttempt(f"attempt {attempt_id} is not current")
            self._insert_log(t, attempt_id, merged, lens)

        self._write(tx)

    def read_log(
        self, attempt_id: int, stream: str, offset: int = 0, limit: int = 1 << 20
    ) -> LogView:
        """Up to ``limit`` characters of a stream from ``offset`` (in characters)."""
        if stream not in ("stdout", "stderr"):
            raise InvalidRequest(f"unknown stream {stream!r}: use stdout or stderr")
        offset = max(0, offset)
        limit = max(0, limit)

        def q(conn: Connection) -> LogView:
            state = conn.execute(
                sa.select(attempts.c.state).where(attempts.c.id == attempt_id)
            ).scalar()
            if state is None:
                raise NotFound(f"attempt {attempt_id} not found")
            rows = conn.execute(
                sa.select(log_chunks.c.start_offset, log_chunks.c.data)
                .where(
                    log_chunks.c.attempt_id == attempt_id,
                    log_chunks.c.stream == stream,
                    log_chunks.c.end_offset > offset,
                    log_chunks.c.start_offset < offset + limit,
                )
                .order_by(log_chunks.c.start_offset)
            ).all()
            parts: list[str] = []
            pos = offset
            for start, data in rows:
                if start > pos:
                    break  # a gap (cannot happen: offsets are allocated contiguously)
                piece = data[pos - start :]
                parts.append(piece)
                pos += len(piece)
            text = "".join(parts)[:limit]
            return LogView(
                attempt_id=attempt_id,
                stream=stream,  # type: ignore[arg-type]
                offset=offset,
                next_offset=offset + len(text),
                data=text,
                complete=state not in _ACTIVE,
            )

        return self._read(q)
