"""The herder store: every SQL statement of the farm lives here (docs/architecture.md).

Rules (DESIGN §2, §5, §10):

- Every state change is one transaction. Task transitions are guarded in SQL
  (``UPDATE tasks … WHERE state IN (TASK_SOURCES[event]) … RETURNING``) and
  write an ``events`` row in the same transaction.
- Times come from the database clock: one ``db_now()`` read at the start of
  each transaction; deadlines are computed from it.
- SQLite has one writer per process (a lock plus ``BEGIN IMMEDIATE``);
  PostgreSQL claims with ``FOR UPDATE SKIP LOCKED`` and write transactions
  are retried on deadlock or serialization failure.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar
from urllib.parse import urlsplit

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError, IntegrityError

from herder.api_models import (
    INLINE_REQUIRE_MAX,
    INLINE_TOTAL_MAX,
    AgentRegister,
    AgentView,
    Completion,
    CompletionResult,
    EventView,
    Heartbeat,
    HeartbeatResponse,
    JobSubmit,
    JobSummary,
    JobView,
    LogChunk,
    LogView,
    MasterFailureReport,
    MasterFailureView,
    MasterView,
    Offer,
    RequiredFile,
    TaskView,
    decode_inline,
    encode_inline,
)
from herder.core.rules import (
    DEFAULT_BLOCKLIST_FORGIVE_S,
    DEFAULT_BLOCKLIST_THRESHOLD,
    DEFAULT_HEARTBEAT_GRACE_S,
    DEFAULT_INFRA_BUDGET,
    DEFAULT_MAINTENANCE_TTL_S,
    DEFAULT_RETRY_ELSEWHERE_S,
    Assigned,
    AttemptPhase,
    BlocklistEntry,
    BlocklistPolicy,
    FailureKind,
    PlacementPolicy,
    RetryDecision,
    RetryPolicy,
    blocklist_strike,
    reconcile,
    retry_decision,
)
from herder.core.states import (
    JOB_SOURCES,
    JOB_TERMINAL,
    TASK_SOURCES,
    JobEvent,
    JobState,
    TaskEvent,
    TaskState,
    next_job_state,
    task_target,
)
from herder.errors import DigestMismatch, InvalidRequest, NotFound, StaleAttempt
from herder.store import engine as _engine
from herder.store import views
from herder.store.schema import (
    UTCDateTime,
    agent_job_failures,
    agents,
    attempts,
    blobs,
    events,
    jobs,
    log_chunks,
    maintenance_lock,
    master_failures,
    masters,
    stages,
    task_tags,
    tasks,
)

T = TypeVar("T")

_ACTIVE = (TaskState.OFFERED.value, TaskState.RUNNING.value)
_ACTIVE_ATTEMPT_SQL = "attempts.state IN ('offered', 'running')"  # matches the partial index
_CLAIMABLE_JOB_STATES = (JobState.QUEUED.value, JobState.RUNNING.value)
_BLOB_QUERY_BATCH = 500
_MAX_TX_RETRIES = 8
_LOOKUP: Any = object()  # sentinel: look the attempt up
REAPER_LOCK = "reaper"


@dataclass(frozen=True)
class WakeTarget:
    """An idle agent's talkback endpoint (``Store.wake_targets``)."""

    agent_id: str
    url: str
    token: str | None


@dataclass
class ClaimOutcome:
    """What one claim transaction did (docs/architecture.md)."""

    offers: list[Offer] = field(default_factory=list)
    results: list[CompletionResult] = field(default_factory=list)
    woke: bool = False  # the transaction made tasks claimable (stage unblocked, retry)
    drain: bool = False  # an operator asked the agent to drain (POST /agents/{id}/drain)


@dataclass
class MasterStatus:
    """What a master writes into its directory row on each heartbeat."""

    id: str
    url: str
    role: str = "read-write"
    heartbeat_timeout_s: float = 6.0
    requests: int = 0
    unhandled_exceptions: int = 0
    avg_request_ms: float = 0.0
    in_flight: int = 0
    version: str | None = None


def _url_netloc(url: str) -> str | None:
    """``host:port`` of a URL (IPv6 bracketed, default port by scheme), as clients name a master."""
    try:
        parts = urlsplit(url)
        host = parts.hostname
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return None
    if not host:
        return None
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass
class _Tx:
    """Per-transaction state: the clock read at its start, pending events, wake flag."""

    conn: Connection
    now: datetime
    events: list[dict[str, Any]] = field(default_factory=list)
    woke: bool = False

    def event(
        self,
        kind: str,
        *,
        job_id: int | None = None,
        task_id: int | None = None,
        attempt_id: int | None = None,
        agent_id: str | None = None,
        from_state: str | None = None,
        to_state: str | None = None,
        reason: str | None = None,
    ) -> None:
        self.events.append(
            {
                "at": self.now,
                "job_id": job_id,
                "task_id": task_id,
                "attempt_id": attempt_id,
                "agent_id": agent_id,
                "kind": kind,
                "from_state": from_state,
                "to_state": to_state,
                "reason": reason,
            }
        )


class _Stmts:
    """Hot-path statements built once, with bind parameters (DESIGN §10: per-task cost).

    Building a Core statement costs more Python time than running it on SQLite;
    these are constructed once per process and reused through the compiled cache.
    """

    def __init__(self, is_pg: bool) -> None:
        bp = sa.bindparam
        self.current_attempt = (
            sa.select(
                attempts.c.id,
                attempts.c.task_id,
                attempts.c.number,
                attempts.c.agent_id,
                attempts.c.token,
                attempts.c.state,
                tasks.c.state.label("task_state"),
                tasks.c.attempt_count,
                tasks.c.job_id,
                tasks.c.stage,
                tasks.c.timeout_s,
                tasks.c.failures,
                tasks.c.infra_failures,
                tasks.c.max_attempts,
            )
            .join_from(attempts, tasks, tasks.c.id == attempts.c.task_id)
            .where(attempts.c.id == bp("b_attempt_id"))
        )
        self.current_attempts = (
            sa.select(*self.current_attempt.selected_columns)
            .join_from(attempts, tasks, tasks.c.id == attempts.c.task_id)
            .where(attempts.c.id.in_(bp("b_ids", expanding=True)))
        )
        self.task_succeed = (
            sa.update(tasks)
            .where(
                tasks.c.id == bp("b_task_id"),
                tasks.c.attempt_count == bp("b_number"),
                tasks.c.state == bp("b_from_state"),
            )
            .values(
                state=TaskState.SUCCEEDED.value,
                exit_code=0,
                error=None,
                finished_at=bp("b_now", type_=UTCDateTime()),
                updated_at=bp("b_now", type_=UTCDateTime()),
            )
            .returning(tasks.c.state)
        )
        self.attempt_finish = (
            sa.update(attempts)
            .where(attempts.c.id == bp("b_attempt_id"))
            .values(
                state=bp("b_attempt_state"),
                exit_code=bp("b_exit_code", type_=sa.Integer()),
                error=bp("b_error", type_=sa.Text()),
                finished_at=bp("b_now", type_=UTCDateTime()),
                outputs=bp("b_outputs", type_=sa.JSON()),
                stdout_len=attempts.c.stdout_len + bp("b_n_stdout", type_=sa.Integer()),
                stderr_len=attempts.c.stderr_len + bp("b_n_stderr", type_=sa.Integer()),
            )
            .returning(attempts.c.stdout_len, attempts.c.stderr_len)
        )
        self.stage_done_one = (
            sa.update(stages)
            .where(stages.c.job_id == bp("b_job_id"), stages.c.position == bp("b_stage"))
            .values(remaining=stages.c.remaining - 1)
            .returning(stages.c.remaining)
        )
        self.claim_agent = (
            sa.update(agents)
            .where(agents.c.id == bp("b_agent_id"))
            .values(last_seen_at=bp("b_now", type_=UTCDateTime()))
            .returning(
                agents.c.tags,
                agents.c.cpus,
                agents.c.ram_mb,
                agents.c.state,
                agents.c.drain_requested,
            )
        )
        tc = tasks.alias("tc")
        foreign_tag = sa.exists().where(
            task_tags.c.task_id == tc.c.id,
            task_tags.c.tag.not_in(bp("b_agent_tags", expanding=True)),
        )
        job_ok = sa.exists().where(
            jobs.c.id == tc.c.job_id, jobs.c.state.in_(_CLAIMABLE_JOB_STATES)
        )
        # herder.core.rules, transcribed: another live agent exists (uncorrelated:
        # evaluated at most once per statement, and stops at the first row)…
        ao = agents.alias("ao")
        other_live = sa.exists().where(
            ao.c.id != bp("b_agent_id"),
            ao.c.state == sa.literal_column("'online'"),
            ao.c.last_seen_at > bp("b_live_since", type_=UTCDateTime()),
        )
        # …may_offer_after_failure: not first on the agent it just failed on…
        retry_here_ok = sa.or_(
            tc.c.last_failed_agent_id.is_(None),
            tc.c.last_failed_agent_id != bp("b_agent_id"),
            tc.c.updated_at <= bp("b_retry_before", type_=UTCDateTime()),
            ~other_live,
        )
        # …is_blocklisted: never to an agent blocklisted for the job (one PK probe).
        bl = agent_job_failures.alias("bl")
        blocked = sa.exists().where(
            bl.c.agent_id == bp("b_agent_id"),
            bl.c.job_id == tc.c.job_id,
            bl.c.blocked_until > bp("b_now", type_=UTCDateTime()),
        )
        cand = (
            sa.select(tc.c.id)
            .where(
                # literal constants so that the partial index ix_tasks_claim applies
                tc.c.state == sa.literal_column("'queued'"),
                tc.c.placement == sa.literal_column("'remote'"),
                tc.c.cpus <= bp("b_agent_cpus", type_=sa.Integer()),
                sa.or_(
                    bp("b_agent_ram", type_=sa.Integer()) == 0,
                    tc.c.ram_mb <= bp("b_agent_ram2", type_=sa.Integer()),
                ),
                ~foreign_tag,
                job_ok,
                retry_here_ok,
                sa.or_(~blocked, ~other_live),
            )
            .order_by(tc.c.priority.desc(), tc.c.id)
            .limit(bp("b_max_tasks", type_=sa.Integer()))
        )
        picked: Any = cand
        if is_pg:
            # A materialized CTE runs the LIMIT … SKIP LOCKED scan exactly once; as a plain
            # IN (subquery) PostgreSQL may re-run it and return more than max_tasks rows.
            cte = (
                cand.with_for_update(of=tc, skip_locked=True)
                .cte("cand")
                .prefix_with("MATERIALIZED")
            )
            picked = sa.select(cte.c.id)
        self.offer = (
            sa.update(tasks)
            .where(
                tasks.c.id.in_(picked),
                tasks.c.state.in_([s.value for s in TASK_SOURCES[TaskEvent.OFFER]]),
            )
            .values(
                state=task_target(TaskEvent.OFFER).value,
                attempt_count=tasks.c.attempt_count + 1,
                agent_id=bp("b_agent_id"),
                updated_at=bp("b_now", type_=UTCDateTime()),
            )
            .returning(
                tasks.c.id,
                tasks.c.job_id,
                tasks.c.priority,
                tasks.c.attempt_count,
                tasks.c.command,
                tasks.c.env,
                tasks.c.requires,
                tasks.c.outputs,
                tasks.c.timeout_s,
            )
        )
        self.insert_attempts = sa.insert(attempts).returning(
            attempts.c.id, sort_by_parameter_order=True
        )
        self.insert_events = sa.insert(events)
        self.insert_log = sa.insert(log_chunks)


def _sqlite_now(conn: Connection) -> datetime:
    raw = conn.exec_driver_sql("SELECT strftime('%Y-%m-%d %H:%M:%f','now')").scalar_one()
    return datetime.fromisoformat(raw).replace(tzinfo=UTC)


def _pg_now(conn: Connection) -> datetime:
    value = conn.exec_driver_sql("SELECT now()").scalar_one()
    assert isinstance(value, datetime)
    return value.astimezone(UTC)


def _verified_inline(completions: Sequence[Completion]) -> dict[str, bytes]:
    """Inline output blobs of ``completions``, each checked against its digest."""
    found: dict[str, bytes] = {}
    for c in completions:
        if not c.blobs:
            continue
        for digest, data in decode_inline(c.blobs).items():
            _check_digest(digest, data, f"inline blob of attempt {c.attempt_id}: ")
            found[digest] = data
    return found


def _check_digest(digest: str, data: bytes, what: str = "") -> str:
    """The sha256 of ``data``; DigestMismatch (nothing stored) unless it is ``digest``."""
    actual = hashlib.sha256(data).hexdigest()
    if actual != digest.lower():
        raise DigestMismatch(
            f"{what}the data's sha256 does not match the digest",
            detail={"expected": digest, "actual": actual},
        )
    return actual


def _inline_for(requires: Sequence[Any], small: dict[str, bytes]) -> dict[str, str]:
    """Base64 of an offer's small required files, at most INLINE_TOTAL_MAX bytes in all."""
    out: dict[str, str] = {}
    total = 0
    for x in requires:
        data = small.get(x["digest"])
        if data is None or x["digest"] in out or total + len(data) > INLINE_TOTAL_MAX:
            continue
        out[x["digest"]] = encode_inline(data)
        total += len(data)
    return out


def _retryable(exc: DBAPIError) -> bool:
    if exc.connection_invalidated:  # a pooled connection died (server restart): retry once more
        return True
    code = getattr(exc.orig, "sqlstate", None)
    if code in ("40001", "40P01"):  # serialization failure, deadlock detected
        return True
    return "database is locked" in str(exc.orig)


def _outcome_error(c: Completion, timeout_s: float | None) -> str | None:
    if c.error:
        return c.error
    if c.outcome == "exited":
        return None if c.exit_code == 0 else f"exit status {c.exit_code}"
    if c.outcome == "timeout":
        return f"timed out after {timeout_s:g}s" if timeout_s is not None else "timed out"
    if c.outcome == "launch_failed":
        return "launch failed"
    if c.outcome == "released":
        return "released by the agent"
    return "cancelled"


def _merge_chunks(chunks: Iterable[LogChunk]) -> dict[str, str]:
    out: dict[str, list[str]] = {}
    for ch in chunks:
        if ch.data:
            out.setdefault(ch.stream, []).append(ch.data)
    return {stream: "".join(parts) for stream, parts in out.items()}


class Store:
    """Synchronous, thread-safe access to the farm's database."""

    def __init__(
        self,
        url: str,
        *,
        migrate: bool = True,
        lease_s: float = 30.0,
        ack_timeout_s: float = 30.0,
        infra_budget: int = DEFAULT_INFRA_BUDGET,
        heartbeat_grace_s: float = DEFAULT_HEARTBEAT_GRACE_S,
        offline_after_s: float | None = None,
        retry_elsewhere_s: float = DEFAULT_RETRY_ELSEWHERE_S,
        blocklist_threshold: int = DEFAULT_BLOCKLIST_THRESHOLD,
        blocklist_forgive_s: float = DEFAULT_BLOCKLIST_FORGIVE_S,
        pool_size: int = 10,
        max_overflow: int = 10,
    ) -> None:
        self.url = _engine.normalize_url(url)
        self.lease_s = float(lease_s)
        self.ack_timeout_s = float(ack_timeout_s)
        self.infra_budget = int(infra_budget)
        self.retry_policy = RetryPolicy(infra_budget=self.infra_budget)
        self.placement_policy = PlacementPolicy(retry_elsewhere_s=float(retry_elsewhere_s))
        self.blocklist_policy = BlocklistPolicy(
            threshold=int(blocklist_threshold), forgive_s=float(blocklist_forgive_s)
        )
        self.heartbeat_grace_s = float(heartbeat_grace_s)
        self.offline_after_s = (
            float(offline_after_s) if offline_after_s is not None else max(3 * self.lease_s, 10.0)
        )
        self._engine = _engine.make_engine(self.url, pool_size=pool_size, max_overflow=max_overflow)
        self.dialect: str = self._engine.dialect.name
        self._is_pg = self.dialect == "postgresql"
        self._db_clock = _pg_now if self._is_pg else _sqlite_now
        self._clock_offset = timedelta(0)
        self._q = _Stmts(self._is_pg)
        self._wlock: contextlib.AbstractContextManager[Any]
        self._rlock: contextlib.AbstractContextManager[Any]
        if self._is_pg:
            self._wlock = contextlib.nullcontext()
            self._rlock = contextlib.nullcontext()
        elif _engine.is_memory_sqlite(self.url):
            # One shared connection: reads must be serialized with writes too.
            lock = threading.RLock()
            self._wlock = lock
            self._rlock = lock
        else:
            assert self.url.database is not None
            from pathlib import Path

            key = str(Path(self.url.database).expanduser().resolve())
            self._wlock = _engine.sqlite_lock(key)
            self._rlock = contextlib.nullcontext()
        if migrate:
            self.migrate()

    @classmethod
    def open(cls, url: str, migrate: bool = True, **kwargs: Any) -> Store:
        return cls(url, migrate=migrate, **kwargs)

    def close(self) -> None:
        self._engine.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def engine(self) -> sa.Engine:
        return self._engine

    def migrate(self, revision: str = "head") -> None:
        with self._write_conn() as conn, conn.begin():
            _engine.upgrade(conn, revision)

    # ------------------------------------------------------------ transactions

    @contextlib.contextmanager
    def _write_conn(self) -> Iterator[Connection]:
        with self._wlock, self._engine.connect() as conn:
            conn.execution_options(herder_write=True)
            yield conn

    def _write(self, fn: Callable[[_Tx], T]) -> T:
        """Run ``fn`` in one write transaction; retried on deadlock/serialization failure."""
        for attempt in range(_MAX_TX_RETRIES):
            try:
                with self._write_conn() as conn, conn.begin():
                    tx = _Tx(conn, self._now_fn(conn))
                    result = fn(tx)
                    if tx.events:
                        conn.execute(self._q.insert_events, tx.events)
                    return result
            except DBAPIError as exc:
                if isinstance(exc, IntegrityError) or not _retryable(exc):
                    raise
                if attempt == _MAX_TX_RETRIES - 1:
                    raise
                time.sleep(0.005 * (2**attempt) * (0.5 + secrets.randbelow(1000) / 1000))
        raise AssertionError("unreachable")

    def _read(self, fn: Callable[[Connection], T]) -> T:
        with self._rlock, self._engine.connect() as conn, conn.begin():
            return fn(conn)

    def _now_fn(self, conn: Connection) -> datetime:
        return self._db_clock(conn) + self._clock_offset

    def db_now(self) -> datetime:
        return self._read(self._now_fn)

    def advance_clock(self, seconds: float) -> None:
        """Move this store's view of the database clock forward (tests and simulations).

        Lease, offer and grace deadlines are compared with the clock read at the
        start of each transaction, so moving it is how a test lets time pass
        without sleeping and without racing a loaded machine.
        """
        self._clock_offset += timedelta(seconds=seconds)

    # ------------------------------------------------------------------- jobs

    def submit_job(self, spec: JobSubmit) -> tuple[JobView, bool]:
        """Insert a job with its stages and tasks; the same idempotency key yields the same job."""
        key = spec.idempotency_key

        def tx(t: _Tx) -> tuple[int, bool]:
            if key is not None:
                existing = t.conn.execute(
                    sa.select(jobs.c.id).where(jobs.c.idempotency_key == key)
                ).scalar()
                if existing is not None:
                    return int(existing), False
            return self._insert_job(t, spec), True

        try:
            job_id, created = self._write(tx)
        except IntegrityError:
            if key is None:
                raise
            # A concurrent submission with the same key won the race: return its job.
            found = self._read(
                lambda c: c.execute(
                    sa.select(jobs.c.id).where(jobs.c.idempotency_key == key)
                ).scalar()
            )
            if found is None:
                raise
            job_id, created = int(found), False
        return self.get_job(job_id), created

    def _insert_job(self, t: _Tx, spec: JobSubmit) -> int:
        conn, now = t.conn, t.now
        job_id = conn.execute(
            sa.insert(jobs)
            .values(
                name=spec.name,
                owner=spec.owner,
                pool=spec.pool,
                priority=spec.priority,
                state=JobState.QUEUED.value,
                idempotency_key=spec.idempotency_key,
                stage_count=len(spec.stages),
                created_at=now,
                updated_at=now,
            )
            .returning(jobs.c.id)
        ).scalar_one()
        conn.execute(
            sa.insert(stages),
            [
                {
                    "job_id": job_id,
                    "position": i,
                    "name": s.name,
                    "task_count": len(s.tasks),
                    "remaining": len(s.tasks),
                }
                for i, s in enumerate(spec.stages)
            ],
        )
        rows: list[dict[str, Any]] = []
        tag_lists: list[list[str]] = []
        for i, s in enumerate(spec.stages):
            state = TaskState.QUEUED.value if i == 0 else TaskState.BLOCKED.value
            for ts in s.tasks:
                tags = sorted(set(ts.tags))
                tag_lists.append(tags)
                rows.append(
                    {
                        "job_id": job_id,
                        "stage": i,
                        "priority": spec.priority,
                        "name": ts.name,
                        "state": state,
                        "command": ts.command,
                        "placement": ts.placement,
                        "requires": [r.model_dump(mode="json") for r in ts.requires],
                        "outputs": ts.outputs,
                        "env": ts.env,
                        "tags": tags,
                        "timeout_s": ts.timeout_s,
                        "max_attempts": ts.max_attempts,
                        "cpus": ts.cpus,
                        "ram_mb": ts.ram_mb,
                        "attempt_count": 0,
                        "failures": 0,
                        "infra_failures": 0,
                        "created_at": now,
                        "updated_at": now,
                    }
                )
        ids = (
            conn.execute(sa.insert(tasks).returning(tasks.c.id, sort_by_parameter_order=True), rows)
            .scalars()
            .all()
        )
        tag_rows = [
            {"task_id": tid, "tag": tag}
            for tid, tags in zip(ids, tag_lists, strict=True)
            for tag in tags
        ]
        if tag_rows:
            conn.execute(sa.insert(task_tags), tag_rows)
        t.event(
            "job.submit",
            job_id=job_id,
            to_state=JobState.QUEUED.value,
            reason=f"{len(ids)} tasks in {len(spec.stages)} stages",
        )
        return int(job_id)

    def get_job(self, job_id: int, *, include_tasks: bool = True) -> JobView:
        def q(conn: Connection) -> JobView:
            job = conn.execute(sa.select(jobs).where(jobs.c.id == job_id)).first()
            if job is None:
                raise NotFound(f"job {job_id} not found")
            stage_rows = conn.execute(
                sa.select(stages).where(stages.c.job_id == job_id).order_by(stages.c.position)
            ).all()
            counts: dict[int, dict[str, int]] = {}
            for stage, state, n in conn.execute(
                sa.select(tasks.c.stage, tasks.c.state, sa.func.count())
                .where(tasks.c.job_id == job_id)
                .group_by(tasks.c.stage, tasks.c.state)
            ):
                counts.setdefault(stage, {})[state] = n
            task_rows: Sequence[Any] = ()
            by_task: dict[int, list[Any]] = {}
            if include_tasks:
                task_rows = conn.execute(
                    sa.select(tasks).where(tasks.c.job_id == job_id).order_by(tasks.c.id)
                ).all()
                for a in conn.execute(
                    sa.select(attempts)
                    .join(tasks, tasks.c.id == attempts.c.task_id)
                    .where(tasks.c.job_id == job_id)
                    .order_by(attempts.c.task_id, attempts.c.number)
                ):
                    by_task.setdefault(a.task_id, []).append(a)
            return views.job_view(job, stage_rows, task_rows, by_task, counts, include_tasks)

        return self._read(q)

    def list_jobs(self, state: str | None = None, limit: int = 100) -> list[JobSummary]:
        def q(conn: Connection) -> list[JobSummary]:
            stmt = sa.select(jobs).order_by(jobs.c.id.desc()).limit(limit)
            if state is not None:
                stmt = stmt.where(jobs.c.state == state)
            rows = conn.execute(stmt).all()
            counts: dict[int, dict[str, int]] = {}
            if rows:
                for jid, st, n in conn.execute(
                    sa.select(tasks.c.job_id, tasks.c.state, sa.func.count())
                    .where(tasks.c.job_id.in_([r.id for r in rows]))
                    .group_by(tasks.c.job_id, tasks.c.state)
                ):
                    counts.setdefault(jid, {})[st] = n
            return [views.job_summary(r, counts.get(r.id, {})) for r in rows]

        return self._read(q)

    def cancel_job(self, job_id: int, reason: str = "cancelled by user") -> JobView:
        def tx(t: _Tx) -> None:
            state = t.conn.execute(sa.select(jobs.c.state).where(jobs.c.id == job_id)).scalar()
            if state is None:
                raise NotFound(f"job {job_id} not found")
            if state in JOB_TERMINAL:
                return
            self._job_transition(t, job_id, JobEvent.CANCEL, reason)
            self._cancel_tasks(t, tasks.c.job_id == job_id, TASK_SOURCES[TaskEvent.CANCEL], reason)

        self._write(tx)
        return self.get_job(job_id)

    def _job_transition(self, t: _Tx, job_id: int, event: JobEvent, reason: str | None) -> bool:
        """Compare-and-set of a job's state, guarded by ``JOB_SOURCES[event]``."""
        stmt = sa.select(jobs.c.state).where(jobs.c.id == job_id)
        if self._is_pg:
            stmt = stmt.with_for_update()
        current = t.conn.execute(stmt).scalar()
        if current is None or current not in JOB_SOURCES[event]:
            return False
        target = next_job_state(JobState(current), event)
        values: dict[str, Any] = {"state": target.value, "updated_at": t.now}
        if target in JOB_TERMINAL:
            values["finished_at"] = t.now
        done = t.conn.execute(
            sa.update(jobs)
            .where(jobs.c.id == job_id, jobs.c.state == current)
            .values(**values)
            .returning(jobs.c.id)
        ).first()
        if done is None:
            return False
        t.event(
            f"job.{event.value}",
            job_id=job_id,
            from_state=current,
            to_state=target.value,
            reason=reason,
        )
        return True

    def _cancel_tasks(
        self, t: _Tx, where: Any, from_states: Iterable[TaskState], reason: str
    ) -> int:
        """Cancel the matching tasks in the given source states (one UPDATE per source)."""
        n = 0
        target = task_target(TaskEvent.CANCEL).value
        for src in from_states:
            assert src in TASK_SOURCES[TaskEvent.CANCEL]
            rows = t.conn.execute(
                sa.update(tasks)
                .where(where, tasks.c.state == src.value)
                .values(state=target, updated_at=t.now, finished_at=t.now)
                .returning(tasks.c.id, tasks.c.job_id, tasks.c.agent_id)
            ).all()
            attempt_of: dict[int, int] = {}
            if src.value in _ACTIVE and rows:
                ids = [r.id for r in rows]
                attempt_of = {
                    task_id: attempt_id
                    for attempt_id, task_id in t.conn.execute(
                        sa.update(attempts)
                        .where(attempts.c.task_id.in_(ids), sa.text(_ACTIVE_ATTEMPT_SQL))
                        .values(state="cancelled", finished_at=t.now, error=reason)
                        .returning(attempts.c.id, attempts.c.task_id)
                    )
                }
            for r in rows:
                t.event(
                    f"task.{TaskEvent.CANCEL.value}",
                    job_id=r.job_id,
                    task_id=r.id,
                    attempt_id=attempt_of.get(r.id),
                    agent_id=r.agent_id if src.value in _ACTIVE else None,
                    from_state=src.value,
                    to_state=target,
                    reason=reason,
                )
            n += len(rows)
        return n

    def _fail_job(self, t: _Tx, job_id: int, reason: str) -> None:
        """A task failed for good: fail the job, cancel its queued and blocked tasks."""
        self._job_transition(t, job_id, JobEvent.FAIL, reason)
        self._cancel_tasks(
            t,
            tasks.c.job_id == job_id,
            (TaskState.BLOCKED, TaskState.QUEUED),
            f"job failed: {reason}",
        )

    def _task_succeeded(self, t: _Tx, job_id: int, stage: int) -> None:
        """Count the success against its stage; the last one queues the next stage."""
        remaining = t.conn.execute(
            self._q.stage_done_one, {"b_job_id": job_id, "b_stage": stage}
        ).scalar()
        if remaining is None or remaining > 0:
            return
        stage_count = t.conn.execute(
            sa.select(jobs.c.stage_count).where(jobs.c.id == job_id)
        ).scalar_one()
        if stage + 1 < stage_count:
            target = task_target(TaskEvent.UNBLOCK).value
            rows = (
                t.conn.execute(
                    sa.update(tasks)
                    .where(
                        tasks.c.job_id == job_id,
                        tasks.c.stage == stage + 1,
                        tasks.c.state.in_([s.value for s in TASK_SOURCES[TaskEvent.UNBLOCK]]),
                    )
                    .values(state=target, updated_at=t.now)
                    .returning(tasks.c.id)
                )
                .scalars()
                .all()
            )
            for tid in rows:
                t.event(
                    f"task.{TaskEvent.UNBLOCK.value}",
                    job_id=job_id,
                    task_id=tid,
                    from_state=TaskState.BLOCKED.value,
                    to_state=target,
                    reason=f"stage {stage} succeeded",
                )
            if rows:
                t.woke = True
        else:
            self._job_transition(t, job_id, JobEvent.SUCCEED, "every task succeeded")

    def get_task(self, task_id: int) -> TaskView:
        def q(conn: Connection) -> TaskView:
            row = conn.execute(sa.select(tasks).where(tasks.c.id == task_id)).first()
            if row is None:
                raise NotFound(f"task {task_id} not found")
            att = conn.execute(
                sa.select(attempts).where(attempts.c.task_id == task_id).order_by(attempts.c.number)
            ).all()
            return views.task_view(row, att)

        return self._read(q)

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

    # ----------------------------------------------------------------- agents

    def register_agent(self, req: AgentRegister) -> tuple[AgentView, bool]:
        agent_id = req.agent_id or f"agent-{secrets.token_hex(8)}"
        values = {
            "name": req.name,
            "hostname": req.hostname,
            "slots": req.slots,
            "tags": sorted(set(req.tags)),
            "cpus": req.cpus,
            "ram_mb": req.ram_mb,
            "talkback_url": req.talkback_url,
            "talkback_token": req.talkback_token,
            "version": req.version,
        }
        if req.mode is not None:
            values["mode"] = req.mode

        def tx(t: _Tx) -> bool:
            # A drained agent stays drained when it registers again (until undrained).
            state = sa.case((agents.c.drain_requested, "draining"), else_="online")
            upd = (
                sa.update(agents)
                .where(agents.c.id == agent_id)
                .values(**values, state=state, last_seen_at=t.now)
                .returning(agents.c.id)
            )
            if t.conn.execute(upd).first() is not None:
                return False
            ins = self._insert_ignore(agents).values(
                id=agent_id, **values, state="online", registered_at=t.now, last_seen_at=t.now
            )
            if t.conn.execute(ins.returning(agents.c.id)).first() is not None:
                t.event("agent.register", agent_id=agent_id, to_state="online")
                return True
            t.conn.execute(upd)  # inserted concurrently by another master
            return False

        created = self._write(tx)
        return self.get_agent(agent_id), created

    def _insert_ignore(self, table: sa.Table) -> Any:
        if self._is_pg:
            from sqlalchemy.dialects.postgresql import insert as pg_insert

            return pg_insert(table).on_conflict_do_nothing()
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        return sqlite_insert(table).on_conflict_do_nothing()

    def _running_counts(self, conn: Connection, agent_id: str | None = None) -> dict[str, int]:
        stmt = (
            sa.select(attempts.c.agent_id, sa.func.count())
            .where(sa.text(_ACTIVE_ATTEMPT_SQL))
            .group_by(attempts.c.agent_id)
        )
        if agent_id is not None:
            stmt = stmt.where(attempts.c.agent_id == agent_id)
        return {a: n for a, n in conn.execute(stmt) if a is not None}

    def get_agent(self, agent_id: str) -> AgentView:
        def q(conn: Connection) -> AgentView:
            now = self._now_fn(conn)
            row = conn.execute(sa.select(agents).where(agents.c.id == agent_id)).first()
            if row is None:
                raise NotFound(f"agent {agent_id} not found")
            running = self._running_counts(conn, agent_id).get(agent_id, 0)
            return views.agent_view(row, running, now, self.offline_after_s)

        return self._read(q)

    def list_agents(self) -> list[AgentView]:
        def q(conn: Connection) -> list[AgentView]:
            now = self._now_fn(conn)
            rows = conn.execute(sa.select(agents).order_by(agents.c.id)).all()
            running = self._running_counts(conn)
            return [
                views.agent_view(r, running.get(r.id, 0), now, self.offline_after_s) for r in rows
            ]

        return self._read(q)

    def wake_targets(self, limit: int = 50, exclude: Iterable[str] = ()) -> list[WakeTarget]:
        """Online agents with a talkback endpoint and a free slot (talkback ``wake``).

        Live by the database clock (``offline_after_s``), not drained, fewer
        active attempts than slots; least recently seen first, at most
        ``limit``. ``exclude``: agents the caller wakes by other means (its
        own parked long-polls). One read; wake-ups only cut latency.
        """
        skip = set(exclude)

        def q(conn: Connection) -> list[WakeTarget]:
            now = self._now_fn(conn)
            rows = conn.execute(
                sa.select(
                    agents.c.id, agents.c.slots, agents.c.talkback_url, agents.c.talkback_token
                )
                .where(
                    agents.c.talkback_url.is_not(None),
                    agents.c.state == "online",
                    agents.c.drain_requested.is_(sa.false()),
                    agents.c.last_seen_at >= now - timedelta(seconds=self.offline_after_s),
                )
                .order_by(agents.c.last_seen_at, agents.c.id)
            ).all()
            rows = [r for r in rows if r.id not in skip]
            if not rows:
                return []
            running = self._running_counts(conn)
            out = []
            for r in rows:
                if running.get(r.id, 0) < r.slots:
                    out.append(WakeTarget(r.id, r.talkback_url, r.talkback_token))
                    if len(out) >= limit:
                        break
            return out

        return self._read(q)

    # ------------------------------------------------------- master directory

    def master_heartbeat(
        self, status: MasterStatus, *, starting: bool = False, state: str = "up"
    ) -> None:
        """Upsert a master's directory row: its stats, ``last_heartbeat_at`` = database now.

        ``starting`` resets ``started_at``; ``state="stopped"`` on graceful shutdown.
        """
        values: dict[str, Any] = {
            "url": status.url,
            "role": status.role,
            "heartbeat_timeout_s": float(status.heartbeat_timeout_s),
            "requests": int(status.requests),
            "unhandled_exceptions": int(status.unhandled_exceptions),
            "avg_request_ms": float(status.avg_request_ms),
            "in_flight": int(status.in_flight),
            "version": status.version,
        }

        def tx(t: _Tx) -> None:
            extra: dict[str, Any] = {"started_at": t.now} if starting else {}
            upd = (
                sa.update(masters)
                .where(masters.c.id == status.id)
                .values(**values, **extra, state=state, last_heartbeat_at=t.now)
                .returning(masters.c.id)
            )
            if t.conn.execute(upd).first() is not None:
                return
            ins = self._insert_ignore(masters).values(
                id=status.id,
                **values,
                state=state,
                started_at=t.now,
                last_heartbeat_at=t.now,
            )
            if t.conn.execute(ins.returning(masters.c.id)).first() is None:
                t.conn.execute(upd)  # inserted concurrently (cannot happen for one id, but cheap)

        self._write(tx)

    def master_stopped(self, status: MasterStatus) -> None:
        """Graceful shutdown: the directory stops listing the master (until it heartbeats)."""
        self.master_heartbeat(status, state="stopped")

    def _find_master(self, conn: Connection, ident: str) -> Any:
        """A ``masters`` row by directory id, URL, or ``host:port`` of its URL; None if unknown.

        Several rows may carry one URL (a machine renamed): the one heard from last wins.
        """
        row = conn.execute(sa.select(masters).where(masters.c.id == ident)).first()
        if row is not None:
            return row
        want = ident.strip().rstrip("/")
        want_netloc = want.lower()
        matches = [
            r
            for r in conn.execute(sa.select(masters)).all()
            if r.url.rstrip("/") == want or (_url_netloc(r.url) or "").lower() == want_netloc
        ]
        if not matches:
            return None
        return max(matches, key=lambda r: r.last_heartbeat_at)

    @staticmethod
    def _no_master(ident: str) -> NotFound:
        return NotFound(f"no master {ident} in the directory", detail={"master": ident})

    def list_masters(self, include_all: bool = False) -> list[MasterView]:
        """The directory: masters that are up (``herder.core.rules.master_visible``), or all."""

        def q(conn: Connection) -> list[MasterView]:
            now = self._now_fn(conn)
            rows = conn.execute(sa.select(masters).order_by(masters.c.id)).all()
            out = [views.master_view(r, now) for r in rows]
            return out if include_all else [m for m in out if m.state == "up"]

        return self._read(q)

    def get_master(self, ident: str) -> MasterView:
        """One master by directory id, URL or ``host:port``, whatever its state; NotFound."""

        def q(conn: Connection) -> MasterView:
            row = self._find_master(conn, ident)
            if row is None:
                raise self._no_master(ident)
            return views.master_view(row, self._now_fn(conn))

        return self._read(q)

    def report_master_failure(self, ident: str, report: MasterFailureReport) -> MasterFailureView:
        """Record a failure to reach a master; the directory hides it until its next heartbeat."""

        def tx(t: _Tx) -> int:
            row = self._find_master(t.conn, ident)
            if row is None:
                raise self._no_master(ident)
            fid = t.conn.execute(
                sa.insert(master_failures)
                .values(
                    master_id=row.id,
                    reported_at=report.time,
                    received_at=t.now,
                    reporter=report.reporter,
                    request=report.request,
                    kind=report.kind,
                    url=report.url,
                )
                .returning(master_failures.c.id)
            ).scalar_one()
            t.conn.execute(
                sa.update(masters)
                .where(masters.c.id == row.id)
                .values(
                    failures=masters.c.failures + 1,
                    last_failure_at=t.now,
                    state=sa.case((masters.c.state == "up", "failed"), else_=masters.c.state),
                )
            )
            return int(fid)

        fid = self._write(tx)

        def q(conn: Connection) -> MasterFailureView:
            r = conn.execute(sa.select(master_failures).where(master_failures.c.id == fid)).one()
            return views.master_failure_view(r)

        return self._read(q)

    def list_master_failures(self, ident: str, limit: int = 100) -> list[MasterFailureView]:
        """Failures reported for a master, newest first."""

        def q(conn: Connection) -> list[MasterFailureView]:
            row = self._find_master(conn, ident)
            if row is None:
                raise self._no_master(ident)
            rows = conn.execute(
                sa.select(master_failures)
                .where(master_failures.c.master_id == row.id)
                .order_by(master_failures.c.id.desc())
                .limit(limit)
            ).all()
            return [views.master_failure_view(r) for r in rows]

        return self._read(q)

    # ------------------------------------------------------------ agent cycle

    def claim(
        self,
        agent_id: str,
        max_tasks: int,
        completions: Sequence[Completion] = (),
        acks: Sequence[int] = (),
    ) -> ClaimOutcome:
        """One transaction: apply completions, then acks, then offer up to ``max_tasks``."""
        inline = _verified_inline(completions)  # DigestMismatch before anything changes

        def tx(t: _Tx) -> ClaimOutcome:
            agent = t.conn.execute(
                self._q.claim_agent, {"b_agent_id": agent_id, "b_now": t.now}
            ).first()
            if agent is None:
                raise NotFound(f"agent {agent_id} not found")
            out = ClaimOutcome()
            if inline:
                self._insert_blobs(t, inline)
            if completions:
                # One lookup for every completion of the batch (no N+1 on the hot path).
                found = {
                    r.id: r
                    for r in t.conn.execute(
                        self._q.current_attempts, {"b_ids": [c.attempt_id for c in completions]}
                    )
                }
                for c in completions:
                    out.results.append(self._complete(t, c, agent_id, found.get(c.attempt_id)))
            for attempt_id in acks:
                self._ack(t, attempt_id, None, agent_id)
            if max_tasks > 0 and agent.state != "draining" and not agent.drain_requested:
                out.offers = self._offer(t, agent_id, agent, max_tasks)
            out.woke = t.woke
            out.drain = bool(agent.drain_requested)
            return out

        return self._write(tx)

    def _offer(self, t: _Tx, agent_id: str, agent: Any, n: int) -> list[Offer]:
        now = t.now
        target = task_target(TaskEvent.OFFER).value
        rows = t.conn.execute(
            self._q.offer,
            {
                "b_agent_tags": list(agent.tags or []),
                "b_agent_cpus": agent.cpus,
                "b_agent_ram": agent.ram_mb,
                "b_agent_ram2": agent.ram_mb,
                "b_max_tasks": n,
                "b_agent_id": agent_id,
                "b_now": now,
                "b_live_since": now - timedelta(seconds=self.offline_after_s),
                "b_retry_before": now - timedelta(seconds=self.placement_policy.retry_elsewhere_s),
            },
        ).all()
        if not rows:
            return []
        rows = sorted(rows, key=lambda r: (-r.priority, r.id))
        ack_deadline = now + timedelta(seconds=self.ack_timeout_s)
        lease_expires = now + timedelta(seconds=self.lease_s)
        params = [
            {
                "task_id": r.id,
                "number": r.attempt_count,
                "agent_id": agent_id,
                "token": secrets.token_hex(16),
                "state": "offered",
                "offered_at": now,
                "ack_deadline": ack_deadline,
                "lease_expires_at": lease_expires,
            }
            for r in rows
        ]
        attempt_ids = t.conn.execute(self._q.insert_attempts, params).scalars().all()
        small = self._small_blobs(t, {x["digest"] for r in rows for x in (r.requires or [])})
        offers = []
        for r, p, aid in zip(rows, params, attempt_ids, strict=True):
            t.event(
                f"task.{TaskEvent.OFFER.value}",
                job_id=r.job_id,
                task_id=r.id,
                attempt_id=aid,
                agent_id=agent_id,
                from_state=TaskState.QUEUED.value,
                to_state=target,
            )
            offers.append(
                Offer(
                    attempt_id=aid,
                    token=p["token"],
                    task_id=r.id,
                    job_id=r.job_id,
                    href=views.task_href(r.id),
                    command=r.command,
                    env=r.env,
                    requires=[RequiredFile.model_validate(x) for x in r.requires],
                    outputs=r.outputs,
                    timeout_s=r.timeout_s,
                    lease_expires_at=lease_expires,
                    ack_deadline=ack_deadline,
                    inline=_inline_for(r.requires or [], small),
                )
            )
        # The first offer of a job starts it.
        job_ids = sorted({r.job_id for r in rows})
        started = (
            t.conn.execute(
                sa.update(jobs)
                .where(
                    jobs.c.id.in_(job_ids),
                    jobs.c.state.in_([s.value for s in JOB_SOURCES[JobEvent.START]]),
                )
                .values(state=JobState.RUNNING.value, updated_at=now)
                .returning(jobs.c.id)
            )
            .scalars()
            .all()
        )
        for jid in started:
            t.event(
                f"job.{JobEvent.START.value}",
                job_id=jid,
                from_state=JobState.QUEUED.value,
                to_state=JobState.RUNNING.value,
                reason="first task offered",
            )
        return offers

    def _current_attempt(self, t: _Tx, attempt_id: int) -> Any:
        return t.conn.execute(self._q.current_attempt, {"b_attempt_id": attempt_id}).first()

    @staticmethod
    def _fenced(
        row: Any, token: str | None, agent_id: str | None, task_states: Iterable[str]
    ) -> bool:
        if row is None:
            return False
        if token is not None and not hmac.compare_digest(row.token, token):
            return False
        if agent_id is not None and row.agent_id != agent_id:
            return False
        return bool(row.attempt_count == row.number and row.task_state in task_states)

    # ----- ack

    def ack(self, attempt_id: int, token: str) -> None:
        """The agent started the offered attempt. Raises StaleAttempt if it is not current."""

        def tx(t: _Tx) -> None:
            if not self._ack(t, attempt_id, token, None):
                raise StaleAttempt(f"attempt {attempt_id} is not current")

        self._write(tx)

    def _ack(self, t: _Tx, attempt_id: int, token: str | None, agent_id: str | None) -> bool:
        row = self._current_attempt(t, attempt_id)
        if not self._fenced(row, token, agent_id, _ACTIVE) or row.state not in _ACTIVE:
            return False
        if row.task_state == TaskState.RUNNING.value:
            return True  # acknowledged already
        lease = t.now + timedelta(seconds=self.lease_s)
        target = task_target(TaskEvent.ACK).value
        done = t.conn.execute(
            sa.update(tasks)
            .where(
                tasks.c.id == row.task_id,
                tasks.c.attempt_count == row.number,
                tasks.c.state.in_([s.value for s in TASK_SOURCES[TaskEvent.ACK]]),
            )
            .values(state=target, updated_at=t.now)
            .returning(tasks.c.id)
        ).first()
        if done is None:
            return False
        t.conn.execute(
            sa.update(attempts)
            .where(attempts.c.id == attempt_id)
            .values(state="running", started_at=t.now, lease_expires_at=lease)
        )
        t.event(
            f"task.{TaskEvent.ACK.value}",
            job_id=row.job_id,
            task_id=row.task_id,
            attempt_id=attempt_id,
            agent_id=row.agent_id,
            from_state=TaskState.OFFERED.value,
            to_state=target,
        )
        return True

    # ----- complete

    def complete(self, c: Completion, agent_id: str | None = None) -> tuple[CompletionResult, bool]:
        """Apply one completion. ``(result, woke)``; a stale completion changes nothing."""
        inline = _verified_inline([c])

        def tx(t: _Tx) -> tuple[CompletionResult, bool]:
            if inline:
                self._insert_blobs(t, inline)
            res = self._complete(t, c, agent_id)
            return res, t.woke

        return self._write(tx)

    def _complete(
        self, t: _Tx, c: Completion, agent_id: str | None, row: Any = _LOOKUP
    ) -> CompletionResult:
        stale = CompletionResult(attempt_id=c.attempt_id, result="stale")
        if row is _LOOKUP:
            row = self._current_attempt(t, c.attempt_id)
        task_states: tuple[str, ...] = _ACTIVE
        attempt_states: tuple[str, ...] = _ACTIVE
        if c.outcome == "cancelled":
            # A cancelled attempt reports back: record it, even if the task was cancelled.
            task_states = (*_ACTIVE, TaskState.CANCELLED.value)
            attempt_states = (*_ACTIVE, "cancelled")
        if not self._fenced(row, c.token, agent_id, task_states) or row.state not in attempt_states:
            return stale

        error = _outcome_error(c, row.timeout_s)
        fail_reason = error or c.outcome
        tk = tasks.c
        guard = [
            tk.id == row.task_id,
            tk.attempt_count == row.number,
            tk.state == row.task_state,
        ]
        values: dict[str, Any] = {"updated_at": t.now}
        attempt_state: str
        decision: RetryDecision | None = None
        if c.outcome == "exited" and c.exit_code == 0:
            attempt_state = "succeeded"
            values.update(
                state=TaskState.SUCCEEDED.value,
                exit_code=0,
                error=None,
                finished_at=t.now,
            )
        elif c.outcome in ("exited", "timeout", "launch_failed"):
            attempt_state = "failed"
            kind = FailureKind.LAUNCH if c.outcome == "launch_failed" else FailureKind.COMMAND
            decision = self._decide(kind, row)
            values.update(self._failure_values(decision, row.agent_id, error, t.now))
            if kind is FailureKind.COMMAND:
                values["exit_code"] = c.exit_code
            # CAS on the budgets the decision was computed from.
            guard += [tk.failures == row.failures, tk.infra_failures == row.infra_failures]
        elif c.outcome == "released" or row.task_state in _ACTIVE:
            # released, or cancelled by the agent on its own: hand the task back.
            attempt_state = "released" if c.outcome == "released" else "cancelled"
            values.update(state=TaskState.QUEUED.value, agent_id=None)
        else:
            attempt_state = "cancelled"  # the task was cancelled: just record the attempt

        new_state: str = row.task_state
        if "state" in values:
            if attempt_state == "succeeded":  # the hot path: a prebuilt statement
                done = t.conn.execute(
                    self._q.task_succeed,
                    {
                        "b_task_id": row.task_id,
                        "b_number": row.number,
                        "b_from_state": row.task_state,
                        "b_now": t.now,
                    },
                ).first()
            else:
                done = t.conn.execute(
                    sa.update(tasks).where(*guard).values(**values).returning(tk.state)
                ).first()
            if done is None:
                return stale
            new_state = done.state
            event = decision.event if decision else self._event_for(c, row.task_state, new_state)
            if event is not None:
                assert row.task_state in {s.value for s in TASK_SOURCES[event]}
            t.event(
                f"task.{event.value if event else c.outcome}",
                job_id=row.job_id,
                task_id=row.task_id,
                attempt_id=row.id,
                agent_id=row.agent_id,
                from_state=row.task_state,
                to_state=new_state,
                reason=error,
            )

        merged = _merge_chunks(c.log)
        outputs = [o.model_dump(mode="json") for o in c.outputs]
        lens = t.conn.execute(
            self._q.attempt_finish,
            {
                "b_attempt_id": row.id,
                "b_attempt_state": attempt_state,
                "b_exit_code": c.exit_code,
                "b_error": error,
                "b_now": t.now,
                "b_outputs": outputs,
                "b_n_stdout": len(merged.get("stdout", "")),
                "b_n_stderr": len(merged.get("stderr", "")),
            },
        ).one()
        self._insert_log(t, row.id, merged, lens)
        if decision is not None and decision.blocklist_strike and row.agent_id is not None:
            self._blocklist_strike(t, row.agent_id, row.job_id, row.task_id, row.id)

        if new_state == TaskState.SUCCEEDED.value:
            self._task_succeeded(t, row.job_id, row.stage)
        elif new_state == TaskState.FAILED.value and row.task_state != new_state:
            self._fail_job(t, row.job_id, f"task {row.task_id} failed: {fail_reason}")
        elif new_state == TaskState.QUEUED.value:
            t.woke = True
        return CompletionResult(attempt_id=c.attempt_id, result="accepted", task_state=new_state)  # type: ignore[arg-type]

    def _decide(self, kind: FailureKind, row: Any) -> RetryDecision:
        """herder.core.rules.retry_decision on a task row (failures, infra_failures, max_attempts)."""
        return retry_decision(
            kind,
            failures=row.failures,
            infra_failures=row.infra_failures,
            max_attempts=row.max_attempts,
            policy=self.retry_policy,
        )

    @staticmethod
    def _failure_values(
        d: RetryDecision, agent_id: str | None, error: str | None, now: datetime
    ) -> dict[str, Any]:
        """The task columns a failed attempt sets, from its retry decision."""
        values: dict[str, Any] = {
            "state": TaskState.QUEUED.value if d.retry else TaskState.FAILED.value,
            "failures": d.failures,
            "infra_failures": d.infra_failures,
            "error": error,
            "finished_at": None if d.retry else now,
            "agent_id": None if d.retry else agent_id,
        }
        if d.avoid_agent and agent_id is not None:
            values["last_failed_agent_id"] = agent_id
        return values

    def _blocklist_strike(
        self, t: _Tx, agent_id: str, job_id: int, task_id: int, attempt_id: int
    ) -> None:
        """Count a failure of the job's task on the agent (herder.core.rules.blocklist_strike)."""
        b = agent_job_failures.c
        t.conn.execute(
            self._insert_ignore(agent_job_failures).values(
                agent_id=agent_id, job_id=job_id, failures=0
            )
        )
        sel = sa.select(b.failures, b.last_failure_at, b.blocked_until).where(
            b.agent_id == agent_id, b.job_id == job_id
        )
        if self._is_pg:
            sel = sel.with_for_update()
        cur = t.conn.execute(sel).one()
        strike = blocklist_strike(
            BlocklistEntry(cur.failures, cur.last_failure_at, cur.blocked_until),
            t.now,
            self.blocklist_policy,
        )
        e = strike.entry
        t.conn.execute(
            sa.update(agent_job_failures)
            .where(b.agent_id == agent_id, b.job_id == job_id)
            .values(
                failures=e.failures,
                last_failure_at=e.last_failure_at,
                blocked_until=e.blocked_until,
            )
        )
        if strike.newly_blocked:
            assert e.blocked_until is not None
            t.event(
                "agent.blocklisted",
                job_id=job_id,
                task_id=task_id,
                attempt_id=attempt_id,
                agent_id=agent_id,
                reason=(
                    f"{e.failures} failures of the job's tasks on this agent; "
                    f"blocklisted for the job until {e.blocked_until.isoformat()}"
                ),
            )

    def blocklist(self, job_id: int | None = None) -> list[dict[str, Any]]:
        """Current (agent, job) strike rows; ``blocked`` says whether the block holds now."""

        def q(conn: Connection) -> list[dict[str, Any]]:
            now = self._now_fn(conn)
            stmt = sa.select(agent_job_failures).order_by(
                agent_job_failures.c.job_id, agent_job_failures.c.agent_id
            )
            if job_id is not None:
                stmt = stmt.where(agent_job_failures.c.job_id == job_id)
            return [
                {
                    "agent_id": r.agent_id,
                    "job_id": r.job_id,
                    "failures": r.failures,
                    "blocked_until": r.blocked_until,
                    "blocked": r.blocked_until is not None and now < r.blocked_until,
                }
                for r in conn.execute(stmt)
            ]

        return self._read(q)

    @staticmethod
    def _event_for(c: Completion, old: str, new: str) -> TaskEvent | None:
        if new == TaskState.SUCCEEDED.value:
            return TaskEvent.SUCCEED
        if c.outcome in ("exited", "timeout"):
            return TaskEvent.FAIL if new == TaskState.FAILED.value else TaskEvent.FAIL_RETRY
        if c.outcome == "launch_failed":
            return TaskEvent.FAIL if new == TaskState.FAILED.value else TaskEvent.RELEASE
        if new == TaskState.QUEUED.value:
            return TaskEvent.RELEASE
        return None

    # ----- logs

    def _insert_log(self, t: _Tx, attempt_id: int, merged: dict[str, str], lens: Any) -> None:
        if not merged:
            return
        rows = []
        for stream, data in merged.items():
            end = lens.stdout_len if stream == "stdout" else lens.stderr_len
            rows.append(
                {
                    "attempt_id": attempt_id,
                    "stream": stream,
                    "start_offset": end - len(data),
                    "end_offset": end,
                    "data": data,
                }
            )
        t.conn.execute(self._q.insert_log, rows)

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

    # ----- heartbeat

    def heartbeat(self, agent_id: str, hb: Heartbeat) -> HeartbeatResponse:
        """Renew the leases of the agent's current attempts; reconcile both ways.

        ``herder.core.rules.reconcile`` decides: an attempt assigned to this
        agent, acknowledged more than ``heartbeat_grace_s`` ago, that the
        heartbeat does not list is requeued as an infrastructure failure; one
        it lists that is not (or no longer) assigned to it is in ``cancel``.
        """
        listed = {r.attempt_id: r.token for r in hb.running}

        def tx(t: _Tx) -> HeartbeatResponse:
            found = t.conn.execute(
                sa.update(agents)
                .where(agents.c.id == agent_id)
                .values(
                    last_seen_at=t.now,
                    usage=hb.usage.model_dump(mode="json") if hb.usage else None,
                    mode=hb.mode,
                    state="draining"
                    if hb.draining
                    else sa.case((agents.c.drain_requested, "draining"), else_="online"),
                )
                .returning(agents.c.id, agents.c.drain_requested)
            ).first()
            if found is None:
                raise NotFound(f"agent {agent_id} not found")
            lease = t.now + timedelta(seconds=self.lease_s)
            # Everything the database assigns to this agent (the partial index).
            rows = {
                r.id: r
                for r in t.conn.execute(
                    self._active_attempts_query()
                    .add_columns(
                        attempts.c.token,
                        attempts.c.state.label("attempt_state"),
                        attempts.c.started_at,
                    )
                    .where(attempts.c.agent_id == agent_id)
                    .order_by(attempts.c.task_id)
                )
            }
            rec = reconcile(
                (
                    Assigned(r.id, r.token, AttemptPhase(r.attempt_state), r.started_at)
                    for r in rows.values()
                ),
                listed,
                t.now,
                self.heartbeat_grace_s,
            )
            if rec.renew:
                t.conn.execute(
                    sa.update(attempts)
                    .where(attempts.c.id.in_(rec.renew), sa.text(_ACTIVE_ATTEMPT_SQL))
                    .values(lease_expires_at=lease)
                )
            for aid in rec.ack:
                self._ack(t, aid, None, agent_id)
            for aid in rec.requeue:
                self._lease_lost(t, rows[aid], "not reported by its agent's heartbeat")
            return HeartbeatResponse(
                cancel=list(rec.cancel),
                lease_expires_at=lease if rec.renew else None,
                lease_s=self.lease_s,
                drain=bool(found.drain_requested),
            )

        return self._write(tx)

    def set_drain(self, agent_id: str, drain: bool = True) -> AgentView:
        """Drain an agent (no new offers; its heartbeats answer ``drain: true``) or undrain it.

        The request persists (a restarted agent stays drained) until undrained.
        """

        def tx(t: _Tx) -> None:
            row = t.conn.execute(
                sa.select(agents.c.state, agents.c.drain_requested).where(agents.c.id == agent_id)
            ).first()
            if row is None:
                raise NotFound(f"agent {agent_id} not found")
            if bool(row.drain_requested) == drain:
                return
            target = "draining" if drain else "online"
            t.conn.execute(
                sa.update(agents)
                .where(agents.c.id == agent_id)
                .values(drain_requested=drain, state=target)
            )
            t.event(
                "agent.drain" if drain else "agent.undrain",
                agent_id=agent_id,
                from_state=row.state,
                to_state=target,
                reason="requested through the API",
            )

        self._write(tx)
        return self.get_agent(agent_id)

    # ----- reaper

    def _active_attempts_query(self) -> sa.Select[Any]:
        return (
            sa.select(
                attempts.c.id,
                attempts.c.task_id,
                attempts.c.number,
                attempts.c.agent_id,
                tasks.c.job_id,
                tasks.c.failures,
                tasks.c.infra_failures,
                tasks.c.max_attempts,
            )
            .join_from(
                attempts,
                tasks,
                sa.and_(
                    tasks.c.id == attempts.c.task_id, tasks.c.attempt_count == attempts.c.number
                ),
            )
            .where(sa.text(_ACTIVE_ATTEMPT_SQL))
        )

    def _lease_lost(self, t: _Tx, row: Any, reason: str) -> str | None:
        """A running attempt is lost: requeue its task, or fail it once the infra budget is spent."""
        tk = tasks.c
        d = self._decide(FailureKind.LOST, row)
        error = reason if d.retry else f"{reason} (infrastructure budget spent)"
        values = self._failure_values(d, row.agent_id, error, t.now)
        if d.retry:
            del values["error"]  # keep the last command error, if any
        done = t.conn.execute(
            sa.update(tasks)
            .where(
                tk.id == row.task_id,
                tk.attempt_count == row.number,
                tk.state.in_([s.value for s in TASK_SOURCES[TaskEvent.LEASE_EXPIRED]]),
                tk.failures == row.failures,
                tk.infra_failures == row.infra_failures,
            )
            .values(**values, updated_at=t.now)
            .returning(tk.state)
        ).first()
        if done is None:
            return None
        t.conn.execute(
            sa.update(attempts)
            .where(attempts.c.id == row.id)
            .values(state="lost", error=reason, finished_at=t.now)
        )
        assert TaskState.RUNNING in TASK_SOURCES[d.event]
        t.event(
            f"task.{d.event.value}",
            job_id=row.job_id,
            task_id=row.task_id,
            attempt_id=row.id,
            agent_id=row.agent_id,
            from_state=TaskState.RUNNING.value,
            to_state=done.state,
            reason=reason,
        )
        if not d.retry:
            self._fail_job(t, row.job_id, f"task {row.task_id} failed: {reason}")
        else:
            t.woke = True
        return str(done.state)

    def reap(self) -> int:
        """Requeue offers past their ack deadline and attempts whose lease expired.

        Returns the number of tasks changed. Safe to run on several masters at
        once (every requeue is a compare-and-set on the task's state and
        attempt number), but periodic reaping goes through ``maintain`` so that
        one master at a time does it.
        """
        return self._write(self._reap)

    def maintain(
        self, holder: str, ttl_s: float = DEFAULT_MAINTENANCE_TTL_S, name: str = REAPER_LOCK
    ) -> int | None:
        """Reap, if ``holder`` holds (or can take) the maintenance lock; ``None`` if not.

        The lock is taken or renewed in the same transaction as the reap: on
        PostgreSQL the lock row stays locked until the reap commits, so two
        masters never reap at once even if a reap outlasts the TTL.
        """

        def tx(t: _Tx) -> int | None:
            if not self._take_lock(t, name, holder, ttl_s):
                return None
            return self._reap(t)

        return self._write(tx)

    def try_lock(
        self, holder: str, ttl_s: float = DEFAULT_MAINTENANCE_TTL_S, name: str = REAPER_LOCK
    ) -> bool:
        """Take or renew a maintenance lock for ``ttl_s`` (database clock). True if held."""
        return self._write(lambda t: self._take_lock(t, name, holder, ttl_s))

    def release_lock(self, holder: str, name: str = REAPER_LOCK) -> bool:
        """Give a held lock up now (graceful shutdown), so another master takes over at once."""

        def tx(t: _Tx) -> bool:
            ml = maintenance_lock.c
            done = t.conn.execute(
                sa.update(maintenance_lock)
                .where(ml.name == name, ml.holder == holder)
                .values(expires_at=t.now - timedelta(seconds=1))
                .returning(ml.name)
            ).first()
            return done is not None

        return self._write(tx)

    def lock_holder(self, name: str = REAPER_LOCK) -> tuple[str, datetime] | None:
        """``(holder, expires_at)`` of a lock row, held or not; None if never taken."""

        def q(conn: Connection) -> tuple[str, datetime] | None:
            row = conn.execute(
                sa.select(maintenance_lock.c.holder, maintenance_lock.c.expires_at).where(
                    maintenance_lock.c.name == name
                )
            ).first()
            return None if row is None else (str(row.holder), row.expires_at)

        return self._read(q)

    def _take_lock(self, t: _Tx, name: str, holder: str, ttl_s: float) -> bool:
        """herder.core.rules.may_take_lock as one conditional UPDATE, then insert-if-missing.

        Race-free: on PostgreSQL a concurrent UPDATE of the row waits for the
        first and re-checks the condition on the new row; the INSERT … ON
        CONFLICT DO NOTHING lets exactly one of two first-comers create it.
        """
        ml = maintenance_lock.c
        expires = t.now + timedelta(seconds=ttl_s)
        got = t.conn.execute(
            sa.update(maintenance_lock)
            .where(ml.name == name, sa.or_(ml.holder == holder, ml.expires_at < t.now))
            .values(holder=holder, expires_at=expires)
            .returning(ml.name)
        ).first()
        if got is not None:
            return True
        ins = self._insert_ignore(maintenance_lock).values(
            name=name, holder=holder, expires_at=expires
        )
        return t.conn.execute(ins.returning(ml.name)).first() is not None

    def _reap(self, t: _Tx) -> int:
        n = 0
        unacked = t.conn.execute(
            self._active_attempts_query()
            .where(
                attempts.c.state == "offered",
                tasks.c.state == TaskState.OFFERED.value,
                attempts.c.ack_deadline < t.now,
            )
            .order_by(attempts.c.task_id)
        ).all()
        target = task_target(TaskEvent.OFFER_EXPIRED).value
        for row in unacked:
            d = self._decide(FailureKind.UNACKED, row)
            assert d.event is TaskEvent.OFFER_EXPIRED and d.retry
            done = t.conn.execute(
                sa.update(tasks)
                .where(
                    tasks.c.id == row.task_id,
                    tasks.c.attempt_count == row.number,
                    tasks.c.state.in_([s.value for s in TASK_SOURCES[TaskEvent.OFFER_EXPIRED]]),
                )
                .values(state=target, agent_id=None, updated_at=t.now)
                .returning(tasks.c.id)
            ).first()
            if done is None:
                continue
            reason = "offer not acknowledged in time"
            t.conn.execute(
                sa.update(attempts)
                .where(attempts.c.id == row.id)
                .values(state="lost", error=reason, finished_at=t.now)
            )
            t.event(
                f"task.{TaskEvent.OFFER_EXPIRED.value}",
                job_id=row.job_id,
                task_id=row.task_id,
                attempt_id=row.id,
                agent_id=row.agent_id,
                from_state=TaskState.OFFERED.value,
                to_state=target,
                reason=reason,
            )
            n += 1
        expired = t.conn.execute(
            self._active_attempts_query()
            .where(
                attempts.c.state == "running",
                tasks.c.state == TaskState.RUNNING.value,
                attempts.c.lease_expires_at < t.now,
            )
            .order_by(attempts.c.task_id)
        ).all()
        for row in expired:
            if self._lease_lost(t, row, "lease expired") is not None:
                n += 1
        if n:
            t.woke = True
        return n

    # ------------------------------------------------------------------ blobs

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

    def has_claimable_work(self) -> bool:
        """Whether any remote task is queued: one probe of the claim index."""
        stmt = (
            sa.select(tasks.c.id)
            .where(tasks.c.state == TaskState.QUEUED.value, tasks.c.placement == "remote")
            .limit(1)
        )
        return self._read(lambda c: c.execute(stmt).first() is not None)

    def has_blob(self, digest: str) -> bool:
        return not self.missing_blobs([digest])
