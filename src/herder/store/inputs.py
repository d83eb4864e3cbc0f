"""Jobs held until their inputs exist (issue 10: two-transaction submission, seeds/004).

A job submitted with ``inputs=later`` whose required blobs are not all stored
is created ``waiting``, like a job waiting for its parents (herder.store.deps):
its first stage's tasks are inserted ``blocked``, so no claim ever sees them.
``job_inputs`` lists the digests it still lacks. The submission's answer is a
continuation naming them (herder.master.api_jobs); the client uploads them.

Every upload (``put_blob``, ``put_blob_file``) removes its digest from every
job's missing set in its own transaction, and releases the jobs that have
nothing missing and no unfinished parent (``waiting → queued``,
``job.release`` with reason "inputs uploaded"). A parent that succeeds
releases only children with nothing missing (``DepsMixin._release_children``).

Races (PostgreSQL, read committed). A submission decides what is missing by
reading ``blobs``; an upload of one of those digests committing meanwhile
would not see the submission's ``job_inputs`` rows yet, and the job would
wait forever. So both take a transaction-scoped advisory lock on the digest's
bucket (one of :data:`_BUCKETS`): the submission exclusively, before anything
else it locks (its buckets in order), the upload shared, after its blob row is
in and before it reads ``job_inputs``. Whichever is second sees the other's
commit. An upload and a finishing parent are serialized on the job's row
(``FOR UPDATE``), each counting what is left after it holds the lock. SQLite
has one writer.

Blobs stored by other paths (inline in a submission, task outputs) do not
release held jobs at once; a re-submission with the same idempotency key looks
again (:meth:`InputsMixin._recheck_inputs`), and so does the next upload.

Maintenance fails a job still missing inputs :attr:`InputsMixin.inputs_timeout_s`
after its submission (``HERDER_INPUTS_TIMEOUT_S``, default one hour) with
reason "inputs never uploaded": a client that crashed between the two
transactions and never came back does not leave a job waiting for ever.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterable, Sequence
from datetime import timedelta

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from herder.api_models import JobSubmit
from herder.core.states import JobEvent, JobState, TaskEvent, TaskState, task_target
from herder.errors import Conflict
from herder.store.common import _BLOB_QUERY_BATCH
from herder.store.deps import DepsMixin
from herder.store.schema import blobs, job_inputs, jobs
from herder.store.tx import _Tx

log = logging.getLogger("herder.store")

_WAITING = JobState.WAITING.value
_QUEUED = JobState.QUEUED.value
_FAILED = JobState.FAILED.value
_UNBLOCKED = task_target(TaskEvent.UNBLOCK).value
_BLOCKED = TaskState.BLOCKED.value

#: Advisory lock space of the submission/upload handshake (pg_advisory_xact_lock(k, bucket)).
_LOCK_SPACE = 0x68696E  # "hin": herder inputs
_BUCKETS = 64
#: Reason of the release an upload causes (event ``job.release``).
RELEASE_REASON = "inputs uploaded"
#: Reason of the failure maintenance records for a job whose inputs never came.
EXPIRE_REASON = "inputs never uploaded"
DEFAULT_INPUTS_TIMEOUT_S = 3600.0
INPUTS_TIMEOUT_ENV = "HERDER_INPUTS_TIMEOUT_S"
#: Jobs failed per maintenance round at most (the rest wait for the next round).
_EXPIRE_BATCH = 100

ReleaseListener = Callable[[Sequence[int]], None]


def required_digests(spec: JobSubmit) -> list[str]:
    """Every digest the job's tasks require, once each, sorted."""
    return sorted(
        {r.digest for stage in spec.stages for task in stage.tasks for r in task.requires}
    )


def bucket_of(digest: str) -> int:
    """The advisory-lock bucket of a digest (its first 8 hex digits, mod :data:`_BUCKETS`)."""
    return int(digest[:8], 16) % _BUCKETS


def inputs_timeout_from_env(env: dict[str, str] | None = None) -> float:
    """``HERDER_INPUTS_TIMEOUT_S`` (seconds, > 0), else the default; ValueError when bad."""
    text = (os.environ if env is None else env).get(INPUTS_TIMEOUT_ENV, "").strip()
    if not text:
        return DEFAULT_INPUTS_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0 or value == float("inf"):
        raise ValueError(f"{INPUTS_TIMEOUT_ENV}={text!r}: expected a positive number of seconds")
    return value


class InputsMixin(DepsMixin):
    """Part of :class:`herder.store.Store`: jobs held until their inputs are uploaded."""

    #: Seconds a job may wait for its inputs before maintenance fails it (None:
    #: ``HERDER_INPUTS_TIMEOUT_S``, else one hour).
    inputs_timeout_s: float | None = None

    # ------------------------------------------------------------ listeners

    def add_release_listener(self, fn: ReleaseListener) -> None:
        """Call ``fn(job_ids)`` after each commit in which an upload released held jobs
        (the master wakes parked claims). Runs in the committing thread; must not block."""
        with self._release_lock():
            self._release_listeners().append(fn)

    def remove_release_listener(self, fn: ReleaseListener) -> None:
        with self._release_lock():
            listeners = self._release_listeners()
            if fn in listeners:
                listeners.remove(fn)

    def _release_lock(self) -> threading.Lock:
        lock: threading.Lock | None = self.__dict__.get("_inputs_lock")
        if lock is None:  # set once; a race here only makes two locks, before any listener
            lock = self.__dict__.setdefault("_inputs_lock", threading.Lock())
        return lock

    def _release_listeners(self) -> list[ReleaseListener]:
        out: list[ReleaseListener] = self.__dict__.setdefault("_inputs_listeners", [])
        return out

    def _announce_released(self, job_ids: Sequence[int]) -> None:
        with self._release_lock():
            listeners = list(self._release_listeners())
        for fn in listeners:
            try:
                fn(job_ids)
            except Exception:  # latency only: the claim's recheck finds the work anyway
                log.exception("event=release_listener_failed jobs=%d", len(job_ids))

    # ------------------------------------------------------------ submission

    def _lock_buckets(self, t: _Tx, digests: Iterable[str], *, shared: bool) -> None:
        """PostgreSQL: the advisory locks of the digests' buckets, in bucket order."""
        if not self._is_pg:
            return
        fn = "pg_advisory_xact_lock_shared" if shared else "pg_advisory_xact_lock"
        for b in sorted({bucket_of(d) for d in digests}):
            t.cur.execute(f"SELECT {fn}(%s, %s)", (_LOCK_SPACE, b))

    def _missing_at_submit(self, t: _Tx, spec: JobSubmit) -> list[str]:
        """The job's required digests not stored (buckets locked first: see the module)."""
        wanted = required_digests(spec)
        if not wanted:
            return []
        self._lock_buckets(t, wanted, shared=False)
        have: set[str] = set()
        for i in range(0, len(wanted), _BLOB_QUERY_BATCH):
            batch = wanted[i : i + _BLOB_QUERY_BATCH]
            have.update(
                t.conn.execute(sa.select(blobs.c.digest).where(blobs.c.digest.in_(batch))).scalars()
            )
        return [d for d in wanted if d not in have]

    def _hold_for_inputs(self, t: _Tx, job_id: int, missing: Sequence[str]) -> None:
        if missing:
            t.conn.execute(
                sa.insert(job_inputs), [{"job_id": job_id, "digest": d} for d in missing]
            )

    def _recheck_inputs(self, t: _Tx, job_id: int) -> None:
        """A re-submission of a held job: digests stored since (by any path) are no longer
        missing, and the job is released if nothing is left."""
        present = sa.select(blobs.c.digest).where(blobs.c.digest == job_inputs.c.digest)
        gone = t.conn.execute(
            sa.delete(job_inputs)
            .where(job_inputs.c.job_id == job_id, sa.exists(present))
            .returning(job_inputs.c.digest)
        ).all()
        if gone:
            self._release_if_ready(t, [job_id])

    # ------------------------------------------------------------ uploads

    def _inputs_arrived(self, t: _Tx, digest: str) -> list[int]:
        """In an upload's transaction, after its blob row is in: the digest is missing
        nowhere any more; jobs left with nothing missing are released. Their ids."""
        self._lock_buckets(t, [digest], shared=True)
        waiting = sorted(
            {
                int(r[0])
                for r in t.conn.execute(
                    sa.delete(job_inputs)
                    .where(job_inputs.c.digest == digest)
                    .returning(job_inputs.c.job_id)
                )
            }
        )
        if not waiting:
            return []
        return self._release_if_ready(t, waiting)

    def _inputs_present(self, digest: str) -> list[int]:
        """An upload of a blob already stored: jobs may still list it (it was stored by
        another path, or by an upload that raced their submission): release them too."""
        listed = self._read(
            lambda c: c.execute(
                sa.select(job_inputs.c.job_id).where(job_inputs.c.digest == digest).limit(1)
            ).first()
        )
        if listed is None:
            return []
        return self._write(lambda t: self._inputs_arrived(t, digest))

    def _release_if_ready(self, t: _Tx, job_ids: Sequence[int]) -> list[int]:
        """Release those of ``job_ids`` that wait, miss no input and have no unfinished parent."""
        stmt = (
            sa.select(jobs.c.id)
            .where(jobs.c.id.in_(job_ids), jobs.c.state == _WAITING)
            .order_by(jobs.c.id)
        )
        if self._is_pg:  # one order: an upload and a finishing parent serialize here
            stmt = stmt.with_for_update()
        candidates = [int(r) for r in t.conn.execute(stmt).scalars()]
        if not candidates:
            return []
        held = self._held_for_inputs(t.conn, candidates)
        pending = self._unsucceeded_parents(t.conn, candidates)
        ready = [j for j in candidates if j not in held and j not in pending]
        released = self._release_jobs(t, ready, RELEASE_REASON)
        if released:
            t.after_commit.append(lambda: self._announce_released(released))
        return released

    def _refuse_retry_without_inputs(self, t: _Tx, job_id: int) -> None:
        """A retry of a job failed because its inputs never came: Conflict (409, nothing
        changed) while one is still not stored; else the record of them is dropped."""
        stored = sa.select(blobs.c.digest).where(blobs.c.digest == job_inputs.c.digest)
        still = [
            str(d)
            for d in t.conn.execute(
                sa.select(job_inputs.c.digest)
                .where(job_inputs.c.job_id == job_id, ~sa.exists(stored))
                .order_by(job_inputs.c.digest)
            ).scalars()
        ]
        if still:
            raise Conflict(
                f"job {job_id} still misses {len(still)} inputs (the first: {still[0]}): "
                "upload them (PUT /api/v1/blobs/{digest}), then retry",
                detail={"job_id": job_id, "missing": still},
            )
        t.conn.execute(sa.delete(job_inputs).where(job_inputs.c.job_id == job_id))

    # ------------------------------------------------------------ reads

    def _held_for_inputs(self, conn: Connection, job_ids: Sequence[int]) -> set[int]:
        """Those of ``job_ids`` that still miss an input."""
        if not job_ids:
            return set()
        return {
            int(j)
            for j in conn.execute(
                sa.select(job_inputs.c.job_id).where(job_inputs.c.job_id.in_(job_ids)).distinct()
            ).scalars()
        }

    def missing_inputs(self, job_id: int) -> list[str]:
        """The digests the job still waits for: empty unless it is waiting (a job failed
        because they never came keeps its list, for the record, but waits no more)."""
        return self._read(
            lambda c: [
                str(d)
                for d in c.execute(
                    sa.select(job_inputs.c.digest)
                    .join(jobs, jobs.c.id == job_inputs.c.job_id)
                    .where(job_inputs.c.job_id == job_id, jobs.c.state == _WAITING)
                    .order_by(job_inputs.c.digest)
                ).scalars()
            ]
        )

    # ------------------------------------------------------------ maintenance

    def _inputs_timeout(self) -> float:
        if self.inputs_timeout_s is not None:
            return float(self.inputs_timeout_s)
        try:
            return inputs_timeout_from_env()
        except ValueError as exc:
            # Maintenance must go on: the default, and the reason in the log each round.
            log.error("event=bad_inputs_timeout error=%r", str(exc))
            return DEFAULT_INPUTS_TIMEOUT_S

    def _expire_inputs(self, t: _Tx) -> int:
        """Under the maintenance lock: fail jobs still missing inputs past the timeout
        (their tasks cancelled, their dependents judged as for any failed job)."""
        timeout = self._inputs_timeout()
        stale = [
            int(j)
            for j in t.conn.execute(
                sa.select(jobs.c.id)
                .where(
                    jobs.c.state == _WAITING,
                    jobs.c.created_at < t.now - timedelta(seconds=timeout),
                    sa.exists().where(job_inputs.c.job_id == jobs.c.id),
                )
                .order_by(jobs.c.id)
                .limit(_EXPIRE_BATCH)
            ).scalars()
        ]
        if not stale:
            return 0
        failed = sorted(
            int(r)
            for r in t.conn.execute(
                sa.update(jobs)
                .where(jobs.c.id.in_(stale), jobs.c.state == _WAITING)
                .values(state=_FAILED, updated_at=t.now, finished_at=t.now)
                .returning(jobs.c.id)
            ).scalars()
        )
        for job_id in failed:
            n = t.conn.execute(
                sa.select(sa.func.count()).where(job_inputs.c.job_id == job_id)
            ).scalar_one()
            reason = f"{EXPIRE_REASON}: {n} missing after {timeout:g}s"
            t.event(
                f"job.{JobEvent.FAIL.value}",
                job_id=job_id,
                from_state=_WAITING,
                to_state=_FAILED,
                reason=reason,
            )
            self._stop_tasks(t, job_id, f"job failed: {reason}")
            self._after_job_transition(t, job_id, JobEvent.FAIL, _FAILED)  # its dependents
        if failed:
            log.info("event=inputs_expired jobs=%d", len(failed))
        return len(failed)
