"""What a client collects of a job: finished tasks with their logs and small outputs.

``follow_page`` is the read behind ``GET /jobs/{id}/follow`` and the embedded
farm's follower (DESIGN §10): one read transaction returns the tasks that
were offered or reached a final state after an event id, each final one with
its exit status, error, whole logs when short, output manifest and the bytes
of its small outputs, so that a client following a build needs no request
per task. It speaks in domain records; the API layer makes wire models.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from herder.api_models import FOLLOW_INLINE_MAX, FOLLOW_LOG_MAX, INLINE_OUTPUT_MAX
from herder.core.states import TASK_TERMINAL
from herder.errors import DigestMismatch, NotFound
from herder.records import FollowPage, OutputRecord, TaskResult
from herder.store.schema import blobs, events

if TYPE_CHECKING:
    from collections.abc import Callable

_BATCH = 500
# A task's final states (TASK_TERMINAL): a rejected one (its pool's ACL) is a
# result too, with the reason as its error and no attempt.
_FINAL = frozenset(s.value for s in TASK_TERMINAL)
_STARTED = frozenset({"offered", "running"})


def _chunks(ids: Sequence[Any]) -> Iterable[Sequence[Any]]:
    for i in range(0, len(ids), _BATCH):
        yield ids[i : i + _BATCH]


class ResultsMixin:
    """Part of :class:`herder.store.Store`: following a job, inline blobs in bulk."""

    if TYPE_CHECKING:
        _is_pg: bool

        def _read(self, fn: Callable[[Connection], Any]) -> Any: ...
        def _write(self, fn: Callable[[Any], Any]) -> Any: ...

    def follow_page(
        self, job_id: int, after: int = 0, limit: int = 1000, *, include_events: bool = False
    ) -> FollowPage:
        """Tasks of ``job_id`` offered or finished after event ``after`` (one read).

        Followers read this after every batch of completions, so it runs on
        the driver's cursor with statements whose text never changes.
        """
        sql = _FollowSql.of(self._is_pg)

        def q(conn: Connection) -> FollowPage:
            cur = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
            try:
                cur.execute(sql.job_state, (job_id,))
                row = cur.fetchone()
                if row is None:
                    raise NotFound(f"job {job_id} not found")
                cur.execute(sql.events, (job_id, after, limit))
                rows = cur.fetchall()
                page = FollowPage(job_id, str(row[0]), rows[-1][0] if rows else after)
                seen_started: set[int] = set()
                final: dict[int, None] = {}
                for _eid, tid, to_state in rows:
                    if tid is None:
                        continue
                    if to_state in _STARTED and tid not in seen_started:
                        seen_started.add(tid)
                        page.started.append(tid)
                    elif to_state in _FINAL:
                        final[tid] = None
                if final:
                    page.results = _task_results(cur, sql, list(final))
            finally:
                cur.close()
            if include_events:
                from herder.store import views

                page.events = [
                    views.event_view(r)
                    for r in conn.execute(
                        sa.select(events)
                        .where(events.c.job_id == job_id, events.c.id > after)
                        .order_by(events.c.id)
                        .limit(limit)
                    )
                ]
            return page

        result: FollowPage = self._read(q)
        return result

    def task_results(self, task_ids: Sequence[int]) -> list[TaskResult]:
        """Results of the given tasks that are in a final state (others are left out)."""
        ids = list(dict.fromkeys(task_ids))
        if not ids:
            return []
        sql = _FollowSql.of(self._is_pg)

        def q(conn: Connection) -> list[TaskResult]:
            cur = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
            try:
                return _task_results(cur, sql, ids)
            finally:
                cur.close()

        out: list[TaskResult] = self._read(q)
        return out

    def put_blobs(self, found: dict[str, bytes]) -> int:
        """Store several blobs in one transaction, each checked against its digest first.

        DigestMismatch (nothing stored) when one does not match. Returns how
        many were new.
        """
        for digest, data in found.items():
            actual = hashlib.sha256(data).hexdigest()
            if actual != digest:
                raise DigestMismatch(
                    "inline blob: the data's sha256 does not match the digest",
                    detail={"expected": digest, "actual": actual},
                )
        if not found:
            return 0
        is_pg = self._is_pg

        def tx(t: Any) -> int:
            have: set[str] = set()
            wanted = list(found)
            for batch in _chunks(wanted):
                have.update(
                    t.conn.execute(
                        sa.select(blobs.c.digest).where(blobs.c.digest.in_(batch))
                    ).scalars()
                )
            rows = [
                {"digest": d, "size": len(found[d]), "data": found[d], "created_at": t.now}
                for d in wanted
                if d not in have
            ]
            if rows:
                if is_pg:
                    from sqlalchemy.dialects.postgresql import insert as pg_insert

                    t.conn.execute(pg_insert(blobs).on_conflict_do_nothing(), rows)
                else:
                    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

                    t.conn.execute(sqlite_insert(blobs).on_conflict_do_nothing(), rows)
            return len(rows)

        n: int = self._write(tx)
        return n


class _FollowSql:
    """The follow read's statements, one text each (the driver keeps them prepared)."""

    _cache: dict[bool, _FollowSql] = {}

    def __init__(self, is_pg: bool) -> None:
        p = "%s" if is_pg else "?"
        # One parameter holds a whole list of ids: ANY(array) / json_each(text).
        ids = f"= ANY({p})" if is_pg else f"IN (SELECT value FROM json_each({p}))"
        self.is_pg = is_pg
        self.job_state = f"SELECT state FROM jobs WHERE id = {p}"
        self.events = (
            f"SELECT id, task_id, to_state FROM events WHERE job_id = {p} AND id > {p} "
            f"ORDER BY id LIMIT {p}"
        )
        self.tasks = (
            f"SELECT id, name, state, exit_code, error, attempt_count FROM tasks WHERE id {ids}"
        )
        self.attempts = (
            "SELECT a.id, a.task_id, a.outputs, a.stdout_len, a.stderr_len "
            "FROM attempts a JOIN tasks t ON t.id = a.task_id AND t.attempt_count = a.number "
            f"WHERE t.id {ids}"
        )
        self.logs = (
            "SELECT attempt_id, stream, data FROM log_chunks "
            f"WHERE attempt_id {ids} ORDER BY attempt_id, stream, start_offset"
        )
        self.blobs = f"SELECT digest, data FROM blobs WHERE digest {ids}"

    @classmethod
    def of(cls, is_pg: bool) -> _FollowSql:
        found = cls._cache.get(is_pg)
        if found is None:
            found = cls._cache[is_pg] = cls(is_pg)
        return found

    def ids(self, values: Sequence[Any]) -> Any:
        return list(values) if self.is_pg else json.dumps(list(values))


def _task_results(cur: Any, sql: _FollowSql, ids: Sequence[int]) -> list[TaskResult]:
    results: dict[int, TaskResult] = {}
    for batch in _chunks(ids):
        cur.execute(sql.tasks, (sql.ids(batch),))
        for tid, name, state, exit_code, error, _count in cur.fetchall():
            if state in _FINAL:
                results[tid] = TaskResult(tid, name, state, exit_code, error)
    by_attempt: dict[int, TaskResult] = {}
    for batch in _chunks(list(results)):
        cur.execute(sql.attempts, (sql.ids(batch),))
        for aid, tid, outputs, stdout_len, stderr_len in cur.fetchall():
            res = results[tid]
            res.attempt_id = aid
            res.stdout_len = stdout_len
            res.stderr_len = stderr_len
            if isinstance(outputs, str | bytes):
                outputs = json.loads(outputs)
            res.outputs = [
                OutputRecord(o["path"], o["digest"], int(o["size"]), int(o.get("mode", 0o644)))
                for o in (outputs or [])
            ]
            by_attempt[aid] = res
    _fill_logs(cur, sql, by_attempt)
    _fill_blobs(cur, sql, list(results.values()))
    return [results[i] for i in ids if i in results]


def _fill_logs(cur: Any, sql: _FollowSql, by_attempt: dict[int, TaskResult]) -> None:
    short: list[int] = []
    for aid, res in by_attempt.items():
        if res.stdout_len <= FOLLOW_LOG_MAX:
            res.stdout = "" if res.stdout_len == 0 else None
        if res.stderr_len <= FOLLOW_LOG_MAX:
            res.stderr = "" if res.stderr_len == 0 else None
        if (0 < res.stdout_len <= FOLLOW_LOG_MAX) or (0 < res.stderr_len <= FOLLOW_LOG_MAX):
            short.append(aid)
    parts: dict[tuple[int, str], list[str]] = {}
    for batch in _chunks(short):
        cur.execute(sql.logs, (sql.ids(batch),))
        for aid, stream, data in cur.fetchall():
            parts.setdefault((aid, stream), []).append(data)
    for (aid, stream), pieces in parts.items():
        res = by_attempt[aid]
        text = "".join(pieces)
        if stream == "stdout" and 0 < res.stdout_len <= FOLLOW_LOG_MAX:
            res.stdout = text
        elif stream == "stderr" and 0 < res.stderr_len <= FOLLOW_LOG_MAX:
            res.stderr = text


def _fill_blobs(cur: Any, sql: _FollowSql, results: list[TaskResult]) -> None:
    wanted: dict[str, list[TaskResult]] = {}
    budget = FOLLOW_INLINE_MAX
    for res in results:
        if res.state != "succeeded":
            continue
        for o in res.outputs:
            if o.digest in wanted:
                wanted[o.digest].append(res)
                continue
            if o.size > INLINE_OUTPUT_MAX or o.size > budget:
                continue
            budget -= o.size
            wanted[o.digest] = [res]
    for batch in _chunks(list(wanted)):
        cur.execute(sql.blobs, (sql.ids(batch),))
        for digest, data in cur.fetchall():
            b = bytes(data)
            for res in wanted[digest]:
                res.blobs[digest] = b


__all__ = ["FollowPage", "OutputRecord", "ResultsMixin", "TaskResult"]
