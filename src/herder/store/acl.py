"""Pool ACLs in the store: who may submit where, checked at submission and at dispatch.

The rules are ``herder.core.acl`` (pure); this module keeps them (table
``pool_acls``) and applies them (issue 11, seeds/002: "All pending jobs will
be then checked against the ACL for the correct permissions. If the check
fails, update the status in the database and log accordingly.").

- **Submission** (``_require_may_submit``, in the submitting transaction):
  a forbidden owner is ``PoolForbidden`` (403) and nothing is written. A
  retried job is checked the same way (``_require_job_may_run``).
- **Dispatch** (``_enforce_pool_acls``, called by the claim before it
  offers): an ACL may change after a job was submitted. Every ACL write bumps
  the farm's ``acl_version`` row; each store remembers the version it last
  enforced and, only when the database's moved, checks every unfinished job
  against its pool's ACL. A job its ACL now forbids has its queued tasks
  marked ``rejected`` (event ``task.reject`` with the reason, a log line)
  and fails, which cancels the rest of its live tasks (``_stop_tasks``):
  nothing of it is ever offered again. When nothing changed the check costs
  nothing: the version comes with the claiming agent's row (``claim_agent``).
- **Races** (PostgreSQL, several masters): an ACL write takes ``pool_acls``
  in EXCLUSIVE mode, which waits for every submission in flight (each reads
  its pool's row FOR SHARE) and holds new ones until it commits. So once a
  claim sees the new version, every job submitted under the old ACL is
  committed and seen by its check. On SQLite writers are serialized anyway.
- **Agents**: what ``--accept-owners``/``--accept-pools`` registered comes
  with the claiming agent's row too, into the scheduler's snapshot and the
  offer window's parameters (``herder.store.acl_sql``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from herder.api_acl import PoolAclView, PoolView
from herder.core.acl import (
    WILDCARD,
    PoolForbidden,
    may_submit,
    normalize_names,
    reject_reason,
    shown_owner,
)
from herder.core.states import JOB_TERMINAL, TASK_SOURCES, JobState, TaskEvent, task_target
from herder.store.schema import acl_version, jobs, pool_acls, tasks
from herder.store.stops import StopsMixin
from herder.store.tx import _Tx

log = logging.getLogger("herder.store")

_LIVE_JOB_STATES = tuple(s.value for s in JobState if s not in JOB_TERMINAL)
_REJECT_SOURCES = tuple(s.value for s in TASK_SOURCES[TaskEvent.REJECT])
_REJECTED = task_target(TaskEvent.REJECT).value
_NEVER = object()  # no version enforced yet: the first claim of a store checks


class AclMixin(StopsMixin):
    """Part of :class:`herder.store.Store`: pool ACLs and what agents accept."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._acl_enforced: object = _NEVER
        super().__init__(*args, **kwargs)

    def _fail_job(self, t: _Tx, job_id: int, reason: str) -> None:
        """Fail the job and stop its work (``herder.store.jobs``)."""
        raise NotImplementedError

    # ------------------------------------------------------------ the API

    def get_pool_acl(self, pool: str) -> PoolAclView:
        def q(conn: Connection) -> PoolAclView:
            row = conn.execute(sa.select(pool_acls).where(pool_acls.c.pool == pool)).first()
            return _acl_view(pool, row, _version(conn))

        return self._read(q)

    def set_pool_acl(self, pool: str, allow: Sequence[str]) -> PoolAclView:
        """Set the owners allowed to submit to ``pool``; every unfinished job is checked
        against it at the next claim."""
        names = normalize_names(allow)

        def tx(t: _Tx) -> None:
            self._lock_acls(t)
            ins = self._insert_ignore(pool_acls).values(pool=pool, allow=names, updated_at=t.now)
            if t.conn.execute(ins.returning(pool_acls.c.pool)).first() is None:
                t.conn.execute(
                    sa.update(pool_acls)
                    .where(pool_acls.c.pool == pool)
                    .values(allow=names, updated_at=t.now)
                )
            version = self._bump_acl_version(t)
            shown = ",".join(names) if names else "(nobody)"
            t.event("pool.acl_set", reason=f"pool {pool}: allow {shown}"[:2000])
            t.after_commit.append(
                lambda: log.info(
                    "event=pool_acl_set pool=%r allow=%r version=%d", pool, shown, version
                )
            )

        self._write(tx)
        return self.get_pool_acl(pool)

    def clear_pool_acl(self, pool: str) -> PoolAclView:
        """Remove the pool's ACL: everyone may submit to it again (none: nothing changes)."""

        def tx(t: _Tx) -> None:
            self._lock_acls(t)
            gone = t.conn.execute(
                sa.delete(pool_acls).where(pool_acls.c.pool == pool).returning(pool_acls.c.pool)
            ).first()
            if gone is None:  # idempotent: a repeated clear changes nothing
                return
            version = self._bump_acl_version(t)
            t.event("pool.acl_clear", reason=f"pool {pool}: everyone allowed")
            t.after_commit.append(
                lambda: log.info("event=pool_acl_clear pool=%r version=%d", pool, version)
            )

        self._write(tx)
        return self.get_pool_acl(pool)

    def list_pools(self) -> tuple[list[PoolView], int]:
        """Every pool with jobs or an ACL, by name, and the farm's ACL version."""
        live = sa.case((jobs.c.state.in_(_LIVE_JOB_STATES), 1), else_=0)

        def q(conn: Connection) -> tuple[list[PoolView], int]:
            counts = {
                r.pool: (int(r.n), int(r.live or 0))
                for r in conn.execute(
                    sa.select(
                        jobs.c.pool, sa.func.count().label("n"), sa.func.sum(live).label("live")
                    ).group_by(jobs.c.pool)
                )
            }
            acls = {r.pool: r for r in conn.execute(sa.select(pool_acls))}
            out = []
            for name in sorted(set(counts) | set(acls)):
                view = _acl_view(name, acls.get(name), 0)
                n, n_live = counts.get(name, (0, 0))
                out.append(
                    PoolView(
                        name=name,
                        allow=view.allow,
                        everyone=view.everyone,
                        restricted=view.restricted,
                        live_jobs=n_live,
                        jobs=n,
                    )
                )
            return out, _version(conn)

        result: tuple[list[PoolView], int] = self._read(q)
        return result

    def _lock_acls(self, t: _Tx) -> None:
        if self._is_pg:  # waits for the submissions in flight, holds new ones (module doc)
            t.conn.exec_driver_sql("LOCK TABLE pool_acls IN EXCLUSIVE MODE")

    def _bump_acl_version(self, t: _Tx) -> int:
        """One more ACL version (the row is created by the first ACL write)."""
        stmt: Any
        if self._is_pg:
            from sqlalchemy.dialects.postgresql import insert as pg_insert

            stmt = pg_insert(acl_version)
        else:
            from sqlalchemy.dialects.sqlite import insert as sqlite_insert

            stmt = sqlite_insert(acl_version)
        stmt = stmt.values(id=1, version=1).on_conflict_do_update(
            index_elements=[acl_version.c.id], set_={"version": acl_version.c.version + 1}
        )
        return int(t.conn.execute(stmt.returning(acl_version.c.version)).scalar_one())

    # ------------------------------------------------------------ submission

    def _require_may_submit(self, t: _Tx, pool: str, owner: str | None) -> None:
        """PoolForbidden unless the pool's ACL lets ``owner`` submit (read FOR SHARE)."""
        stmt = sa.select(pool_acls.c.allow).where(pool_acls.c.pool == pool)
        if self._is_pg:
            stmt = stmt.with_for_update(read=True)
        row = t.conn.execute(stmt).first()
        if row is not None and not may_submit(row.allow, owner):
            raise PoolForbidden(
                f"{reject_reason(pool, owner)} to submit",
                detail={"pool": pool, "owner": owner},
            )

    def _require_job_may_run(self, t: _Tx, job_id: int) -> None:
        """The same check for a job already in the database (a retry runs it again)."""
        row = t.conn.execute(
            sa.select(jobs.c.pool, jobs.c.owner).where(jobs.c.id == job_id)
        ).first()
        if row is not None:
            self._require_may_submit(t, row.pool, row.owner)

    # ------------------------------------------------------------ dispatch

    def _enforce_pool_acls(self, t: _Tx, version: object) -> None:
        """Before the claim offers: reject what the ACLs forbid, if they changed since
        this store last checked (``version``: the farm's, read with the claiming agent's row)."""
        if version == self._acl_enforced:
            return
        self._reject_forbidden(t)

        def enforced() -> None:
            self._acl_enforced = version

        t.after_commit.append(enforced)

    def _reject_forbidden(self, t: _Tx) -> int:
        """Reject every unfinished job its pool's ACL forbids; returns how many."""
        rows = t.conn.execute(
            sa.select(jobs.c.id, jobs.c.pool, jobs.c.owner, pool_acls.c.allow)
            .join(pool_acls, pool_acls.c.pool == jobs.c.pool)
            .where(jobs.c.state.in_(_LIVE_JOB_STATES))
            .order_by(jobs.c.id)
        ).all()
        n = 0
        for r in rows:
            if not may_submit(r.allow, r.owner):
                n += self._reject_job(t, int(r.id), r.pool, r.owner)
        return n

    def _reject_job(self, t: _Tx, job_id: int, pool: str, owner: str | None) -> int:
        """Queued tasks → rejected (never offered), then the job fails; 1 if it was live."""
        state = self._lock_job(t, job_id)
        if state is None or state not in _LIVE_JOB_STATES:
            return 0
        reason = reject_reason(pool, owner)
        tk = tasks.c
        queued = sa.and_(tk.job_id == job_id, tk.state.in_(_REJECT_SOURCES))
        if self._is_pg:  # wait for a claim offering them right now (it wins; _fail_job stops it)
            t.conn.execute(sa.select(tk.id).where(queued).with_for_update()).all()
        ids = sorted(
            int(r.id)
            for r in t.conn.execute(
                sa.update(tasks)
                .where(queued)
                .values(state=_REJECTED, error=reason, finished_at=t.now, updated_at=t.now)
                .returning(tk.id)
            )
        )
        for task_id in ids:
            t.event(
                f"task.{TaskEvent.REJECT.value}",
                job_id=job_id,
                task_id=task_id,
                from_state=_REJECT_SOURCES[0],
                to_state=_REJECTED,
                reason=reason,
            )
        self._fail_job(t, job_id, reason)
        t.after_commit.append(
            lambda: log.warning(
                "event=acl_reject job=%d pool=%r owner=%r tasks_rejected=%d reason=%r",
                job_id,
                pool,
                shown_owner(owner),
                len(ids),
                reason,
            )
        )
        return 1


def _version(conn: Connection) -> int:
    found = conn.execute(sa.select(acl_version.c.version).where(acl_version.c.id == 1)).scalar()
    return 0 if found is None else int(found)


def _acl_view(pool: str, row: Any, version: int) -> PoolAclView:
    if row is None:
        return PoolAclView(
            pool=pool, allow=[WILDCARD], everyone=True, restricted=False, version=version
        )
    allow = list(row.allow)
    return PoolAclView(
        pool=pool,
        allow=allow,
        everyone=WILDCARD in allow,
        restricted=True,
        updated_at=row.updated_at,
        version=version,
    )


__all__ = ["AclMixin"]
