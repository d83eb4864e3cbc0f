"""Hot-path SQL, written once per dialect and executed through the DBAPI driver (DESIGN §10).

SQLAlchemy Core's per-execute machinery (compile cache lookup, parameter
processing, result metadata) costs more Python time than SQLite takes to run
the statement. The statements of the claim cycle are therefore plain SQL
strings, built once per ``Store`` for its dialect and run on the raw driver
cursor of the transaction's connection (``_Tx.cur``), inside the same
transaction as any Core statement of that transaction.

Values are bound exactly as the schema's types store them, so that reads
through Core still work: timestamps as naive UTC (on SQLite the text
SQLAlchemy writes, ``'2026-12-01 21:30:00.123456'``), JSON as ``json.dumps``
text (PostgreSQL: cast to ``json``).

Templates use ``?`` (positional) or ``:name`` (named) parameters and
``JSON(…)`` around a JSON-typed parameter; ``_compile`` turns them into the
driver's style (sqlite3: ``?``/``:name``; psycopg: ``%s``/``%(name)s``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, NamedTuple

from herder.core.states import JOB_SOURCES, TASK_SOURCES, JobEvent, TaskEvent
from herder.store.acl_sql import accepts_sql
from herder.store.common import _CLAIMABLE_JOB_STATES


def _states(event: TaskEvent) -> str:
    return ", ".join(f"'{s.value}'" for s in TASK_SOURCES[event])


class AttemptRow(NamedTuple):
    """An attempt with its task's current state (and its stage's remaining count)."""

    id: int
    task_id: int
    number: int
    agent_id: str | None
    token: str
    state: str
    task_state: str
    attempt_count: int
    job_id: int
    stage: int
    timeout_s: float | None
    failures: int
    infra_failures: int
    max_attempts: int
    remaining: int | None


_ATTEMPT_COLUMNS = (
    "attempts.id, attempts.task_id, attempts.number, attempts.agent_id, attempts.token, "
    "attempts.state, tasks.state, tasks.attempt_count, tasks.job_id, tasks.stage, "
    "tasks.timeout_s, tasks.failures, tasks.infra_failures, tasks.max_attempts, "
    "stages.remaining"
)
_ATTEMPT_FROM = (
    "FROM attempts JOIN tasks ON tasks.id = attempts.task_id "
    "LEFT OUTER JOIN stages ON stages.job_id = tasks.job_id AND stages.position = tasks.stage"
)
_TASK_COLUMNS = (
    "id, job_id, stage, priority, name, state, command, placement, requires, outputs, env, "
    "tags, timeout_s, max_attempts, cpus, ram_mb, attempt_count, failures, infra_failures, "
    "created_at, updated_at, progress_pattern, stuck_timeout_s, gpus, share_key"
)


class HotSql:
    """The hot-path statements of one dialect, and how to bind and read values."""

    def __init__(self, is_pg: bool) -> None:
        self.is_pg = is_pg
        self._in_cache: dict[int, str] = {}
        self._sql_cache: dict[tuple[str, int], str] = {}
        c = self._compile
        self.now = "SELECT now()" if is_pg else "SELECT strftime('%Y-%m-%d %H:%M:%f','now')"
        self.insert_events_sql = c(
            "INSERT INTO events (at, job_id, task_id, attempt_id, agent_id, kind, from_state, "
            "to_state, reason) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
        )
        self.claim_agent = c(
            "UPDATE agents SET last_seen_at = ? WHERE agents.id = ? "
            "RETURNING tags, cpus, ram_mb, state, drain_requested, slots, gpus, max_ram_mb, "
            "max_load, usage, accept_owners, accept_pools, "
            "(SELECT acl_version.version FROM acl_version WHERE acl_version.id = 1)"
        )
        self.task_succeed = c(
            "UPDATE tasks SET state = 'succeeded', exit_code = 0, error = NULL, finished_at = ?, "
            "updated_at = ? WHERE tasks.id = ? AND tasks.attempt_count = ? AND tasks.state = ? "
            "RETURNING state"
        )
        finish = (
            "UPDATE attempts SET state = ?, exit_code = ?, error = ?, finished_at = ?, "
            "outputs = JSON(?), stdout_len = attempts.stdout_len + ?, "
            "stderr_len = attempts.stderr_len + ? WHERE attempts.id = ?"
        )
        self.attempt_finish = c(finish + " RETURNING stdout_len, stderr_len")
        self.attempt_finish_quiet = c(finish)
        self.insert_log = c(
            "INSERT INTO log_chunks (attempt_id, stream, start_offset, end_offset, data) "
            "VALUES (?, ?, ?, ?, ?)"
        )
        self.stage_done = c(
            "UPDATE stages SET remaining = stages.remaining - ? "
            "WHERE stages.job_id = ? AND stages.position = ? RETURNING remaining"
        )
        job_start = ", ".join(f"'{s.value}'" for s in JOB_SOURCES[JobEvent.START])
        self.job_start = c(
            "UPDATE jobs SET state = 'running', updated_at = ? "
            f"WHERE jobs.id = ? AND jobs.state IN ({job_start}) RETURNING id"
        )
        self.ack_task = c(
            "UPDATE tasks SET state = 'running', updated_at = ? WHERE tasks.id = ? "
            f"AND tasks.attempt_count = ? AND tasks.state IN ({_states(TaskEvent.ACK)}) "
            "RETURNING id"
        )
        self.ack_attempt = c(
            "UPDATE attempts SET state = 'running', started_at = ?, lease_expires_at = ? "
            "WHERE attempts.id = ?"
        )
        self.current_attempt = c(f"SELECT {_ATTEMPT_COLUMNS} {_ATTEMPT_FROM} WHERE attempts.id = ?")
        self.offer_window = c(self._window_sql())
        # What the agent holds now (its reservations: herder.core.schedule).
        self.agent_held = c(
            "SELECT count(*), coalesce(sum(tasks.cpus), 0), coalesce(sum(tasks.ram_mb), 0), "
            "coalesce(sum(tasks.gpus), 0) FROM attempts JOIN tasks ON tasks.id = attempts.task_id "
            "WHERE attempts.agent_id = ? AND attempts.state IN ('offered', 'running') "
            "AND tasks.state IN ('offered', 'running') AND tasks.attempt_count = attempts.number"
        )
        self.insert_tasks = c(
            f"INSERT INTO tasks ({_TASK_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, JSON(?), ?, JSON(?), "
            "JSON(?), JSON(?), JSON(?), ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
        )
        self.insert_task_tags = c("INSERT INTO task_tags (task_id, tag) VALUES (?, ?)")
        self.task_ids = c("SELECT id FROM tasks WHERE job_id = ? ORDER BY id")
        self.alloc_task_ids = (
            "SELECT nextval(pg_get_serial_sequence('tasks', 'id')) FROM generate_series(1, %s)"
            if is_pg
            else "SELECT coalesce(max(id), 0) FROM tasks"
        )

    def _window_sql(self) -> str:
        """The claim's window: one scan of ``ix_tasks_claim``, with primary-key probes.

        ``herder.core.rules``, transcribed: the task fits the agent on its own
        (cpus, GPUs, RAM against its capacity, no tag the agent lacks, no
        ``!tag`` it has), its job is queued or running; not first on the agent
        it just failed on (``may_offer_after_failure``: unless it waited
        ``retry_elsewhere_s`` or no other agent is live; that EXISTS is
        uncorrelated, evaluated at most once per statement), and never to an
        agent blocklisted for the job (same fallback). The state literals make
        the partial index apply. ``herder.core.schedule`` then picks from the
        window what fits together and what fair share wants; PostgreSQL locks
        the window (SKIP LOCKED) so that concurrent claims read disjoint ones.
        """
        if self.is_pg:
            lacks = "task_tags.tag <> ALL(CAST(:tags AS text[]))"
            has_negated = "task_tags.tag = ANY(CAST(:negated AS text[]))"
        else:
            lacks = "task_tags.tag NOT IN (SELECT value FROM json_each(:tags))"
            has_negated = "task_tags.tag IN (SELECT value FROM json_each(:negated))"
        foreign = f"(({lacks}) AND substr(task_tags.tag, 1, 1) <> '!') OR ({has_negated})"
        claimable = ", ".join(f"'{s}'" for s in _CLAIMABLE_JOB_STATES)
        other_live = (
            "EXISTS (SELECT 1 FROM agents AS ao WHERE ao.id != :agent_id "
            "AND ao.state = 'online' AND ao.last_seen_at > :live_since)"
        )
        window = (
            "SELECT tc.id, tc.job_id, tc.priority, tc.share_key, tc.cpus, tc.ram_mb, tc.gpus, "
            "jobs.owner, jobs.pool FROM tasks AS tc "
            f"{'JOIN' if self.is_pg else 'CROSS JOIN'} jobs ON jobs.id = tc.job_id "
            "WHERE tc.state = 'queued' AND tc.placement = 'remote' AND tc.cpus <= :cpus "
            "AND tc.gpus <= :gpus AND (:ram = 0 OR tc.ram_mb <= :ram) "
            f"AND NOT (EXISTS (SELECT 1 FROM task_tags WHERE task_tags.task_id = tc.id AND ({foreign}))) "
            f"AND jobs.state IN ({claimable}) "
            f"{accepts_sql(self.is_pg)}"  # the agent's --accept-owners/-pools (herder.core.acl)
            "AND (tc.last_failed_agent_id IS NULL OR tc.last_failed_agent_id != :agent_id "
            f"OR tc.updated_at <= :retry_before OR NOT ({other_live})) "
            "AND (NOT (EXISTS (SELECT 1 FROM agent_job_failures AS bl WHERE bl.agent_id = :agent_id "
            f"AND bl.job_id = tc.job_id AND bl.blocked_until > :now)) OR NOT ({other_live})) "
            "ORDER BY tc.priority DESC, tc.share_key, tc.id LIMIT :n"
        )
        if self.is_pg:
            window += " FOR UPDATE OF tc SKIP LOCKED"
        return window

    def offer_tasks(self, n: int) -> str:
        """Guarded ``queued → offered`` of ``n`` picked task ids (params: now, agent, ids)."""

        def build(n: int) -> str:
            return self._compile(
                "UPDATE tasks SET state = 'offered', attempt_count = tasks.attempt_count + 1, "
                f"agent_id = ?, updated_at = ? WHERE tasks.id IN ({self._marks(n)}) "
                f"AND tasks.state IN ({_states(TaskEvent.OFFER)}) RETURNING tasks.id, "
                "tasks.job_id, tasks.priority, tasks.attempt_count, tasks.command, tasks.env, "
                "tasks.requires, tasks.outputs, tasks.timeout_s, tasks.cpus, tasks.ram_mb, "
                "tasks.gpus, tasks.progress_pattern, tasks.stuck_timeout_s"
            )

        return self._multi("offer_tasks", n, build)

    def _compile(self, sql: str) -> str:
        if self.is_pg:
            sql = re.sub(r"JSON\(([^()]*)\)", r"CAST(\1 AS json)", sql)
            sql = sql.replace("?", "%s")
            sql = re.sub(r"(?<![:\w]):([a-z_]+)", r"%(\1)s", sql)
        else:
            sql = re.sub(r"JSON\(([^()]*)\)", r"\1", sql)
        return sql

    # ----------------------------------------------------------- sized statements

    def _marks(self, n: int) -> str:
        marks = self._in_cache.get(n)
        if marks is None:
            mark = "%s" if self.is_pg else "?"
            marks = self._in_cache[n] = ", ".join([mark] * n)
        return marks

    def current_attempts(self, n: int) -> str:
        key = ("current_attempts", n)
        sql = self._sql_cache.get(key)
        if sql is None:
            sql = self._sql_cache[key] = (
                f"SELECT {_ATTEMPT_COLUMNS} {_ATTEMPT_FROM} WHERE attempts.id IN ({self._marks(n)})"
            )
        return sql

    def insert_attempts(self, n: int) -> str:
        key = ("insert_attempts", n)
        sql = self._sql_cache.get(key)
        if sql is None:
            m = "%s" if self.is_pg else "?"
            row = f"({m}, {m}, {m}, {m}, 'offered', {m}, {m}, {m})"
            sql = self._sql_cache[key] = (
                "INSERT INTO attempts (task_id, number, agent_id, token, state, offered_at, "
                f"ack_deadline, lease_expires_at) VALUES {', '.join([row] * n)} "
                "RETURNING id, task_id"
            )
        return sql

    def renew(self, n: int) -> str:
        key = ("renew", n)
        sql = self._sql_cache.get(key)
        if sql is None:
            m = "%s" if self.is_pg else "?"
            sql = self._sql_cache[key] = (
                f"UPDATE attempts SET lease_expires_at = {m} WHERE attempts.id IN "
                f"({self._marks(n)}) AND attempts.state IN ('offered', 'running')"
            )
        return sql

    def small_blobs(self, n: int) -> str:
        """The digest and bytes of those of ``n`` digests no larger than a size (params: digests, size)."""
        m = "%s" if self.is_pg else "?"
        return self._multi(
            "small_blobs",
            n,
            lambda n: (
                f"SELECT digest, data FROM blobs WHERE digest IN ({self._marks(n)}) AND size <= {m}"
            ),
        )

    def insert_blobs(
        self, cur: Any, at: Any, stale_before: Any, rows: Sequence[tuple[str, bytes]]
    ) -> None:
        """Store ``(digest, data)`` rows; a known one only has a stale ``created_at`` refreshed."""
        m = "%s" if self.is_pg else "?"
        conflict = (
            "ON CONFLICT (digest) DO UPDATE SET created_at = excluded.created_at "
            f"WHERE blobs.created_at < {m}"
        )
        head = "INSERT INTO blobs (digest, size, created_at, data) VALUES "
        row = f"({m}, {m}, {m}, {m})"
        if not self.is_pg:
            sql = self._multi("insert_blobs", 1, lambda _n: f"{head}{row} {conflict}")
            cur.executemany(sql, [(d, len(b), at, b, stale_before) for d, b in rows])
            return
        sql = self._multi(
            "insert_blobs", len(rows), lambda n: f"{head}{', '.join([row] * n)} {conflict}"
        )
        flat: list[Any] = [v for d, b in rows for v in (d, len(b), at, b)]
        cur.execute(sql, [*flat, stale_before])

    # ----------------------------------------------------------- values

    def ts(self, dt: datetime | None) -> Any:
        """A timestamp bound as ``UTCDateTime`` stores it (naive UTC)."""
        if dt is None:
            return None
        if dt.tzinfo is not None and dt.tzinfo is not UTC:
            dt = dt.astimezone(UTC)
        dt = dt.replace(tzinfo=None)
        if self.is_pg:
            return dt
        text = dt.isoformat(" ")  # SQLAlchemy's format: always six digits of microseconds
        return text if dt.microsecond else text + ".000000"

    @staticmethod
    def js(value: Any) -> str:
        """A JSON column's value as SQLAlchemy's ``JSON`` type writes it (``None`` is ``null``)."""
        return json.dumps(value)

    def load(self, value: Any) -> Any:
        """A JSON column read through the driver: text on SQLite; psycopg decodes ``json``."""
        if self.is_pg or value is None:
            return value
        if value == "[]":
            return []
        if value == "{}":
            return {}
        return json.loads(value)

    def tags_param(self, tags: Sequence[str]) -> Any:
        return list(tags) if self.is_pg else json.dumps(list(tags))

    # ----------------------------------------------------------- batches
    #
    # sqlite3 runs executemany in C. psycopg runs it in pipeline mode, whose wait
    # loop spins on the writable socket until the server answers (CPU burnt in the
    # client, taken from the server on a small machine): on PostgreSQL a batch is
    # one multi-row statement instead, one round trip.

    def _multi(self, name: str, n: int, build: Any) -> str:
        key = (name, n)
        sql = self._sql_cache.get(key)
        if sql is None:
            sql = self._sql_cache[key] = build(n)
        return sql

    def insert_events(self, cur: Any, rows: Sequence[tuple[Any, ...]]) -> None:
        if not self.is_pg:
            cur.executemany(self.insert_events_sql, rows)
            return
        if len(rows) == 1:
            cur.execute(self.insert_events_sql, rows[0])
            return
        row = "(" + ", ".join(["%s"] * 9) + ")"
        sql = self._multi(
            "events",
            len(rows),
            lambda n: (
                self.insert_events_sql.split(" VALUES ")[0] + " VALUES " + ", ".join([row] * n)
            ),
        )
        cur.execute(sql, [v for r in rows for v in r])

    def succeed_tasks(
        self, cur: Any, at: Any, keys: Sequence[tuple[int, int, str]]
    ) -> list[tuple[str] | None]:
        """Guarded ``offered|running → succeeded`` of ``(task_id, attempt_number, state)``s.

        Aligned with ``keys``: the task's new state, or None where the guard failed
        (a repeated key succeeds once, at its first occurrence, as one at a time would).
        """
        if not self.is_pg or len(keys) == 1:
            return [cur.execute(self.task_succeed, (at, at, *k)).fetchone() for k in keys]

        def build(n: int) -> str:
            values = ", ".join(["(%s::int, %s::int, %s::text)"] * n)
            return (
                "UPDATE tasks SET state = 'succeeded', exit_code = 0, error = NULL, "
                f"finished_at = %s, updated_at = %s FROM (VALUES {values}) AS v(id, n, st) "
                "WHERE tasks.id = v.id AND tasks.attempt_count = v.n AND tasks.state = v.st "
                "RETURNING tasks.id, tasks.attempt_count, tasks.state"
            )

        got = {
            (r[0], r[1]): r[2]
            for r in cur.execute(
                self._multi("succeed", len(keys), build), [at, at, *(v for k in keys for v in k)]
            ).fetchall()
        }
        out: list[tuple[str] | None] = []
        for task_id, number, _ in keys:
            state = got.pop((task_id, number), None)
            out.append(None if state is None else (state,))
        return out

    def finish_attempts(self, cur: Any, at: Any, rows: Sequence[tuple[Any, ...]]) -> None:
        """Finish attempts: ``(id, state, exit_code, error, outputs_json, n_stdout, n_stderr)``."""
        if not self.is_pg or len(rows) == 1:
            params = [(st, ec, err, at, out, no, ne, aid) for aid, st, ec, err, out, no, ne in rows]
            if len(params) == 1:
                cur.execute(self.attempt_finish_quiet, params[0])
            else:
                cur.executemany(self.attempt_finish_quiet, params)
            return

        def build(n: int) -> str:
            values = ", ".join(
                ["(%s::int, %s::text, %s::int, %s::text, %s::text, %s::int, %s::int)"] * n
            )
            return (
                "UPDATE attempts SET state = v.st, exit_code = v.ec, error = v.err, "
                "finished_at = %s, outputs = CAST(v.out AS json), "
                "stdout_len = attempts.stdout_len + v.no, stderr_len = attempts.stderr_len + v.ne "
                f"FROM (VALUES {values}) AS v(id, st, ec, err, out, no, ne) WHERE attempts.id = v.id"
            )

        cur.execute(self._multi("finish", len(rows), build), [at, *(v for r in rows for v in r)])
