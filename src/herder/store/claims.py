"""The agent cycle: claim (completions, acks, offers in one transaction) and ack."""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from datetime import timedelta
from typing import Any, TypeVar

from herder.api_models import (
    Completion,
    Offer,
    RequiredFile,
)
from herder.core.schedule import AgentSnapshot, Candidate, schedule
from herder.core.states import (
    JobEvent,
    JobState,
    TaskEvent,
    TaskState,
    task_target,
)
from herder.errors import NotFound, StaleAttempt
from herder.store import views
from herder.store.acl_sql import accepts_params
from herder.store.common import (
    _ACTIVE,
    ClaimOutcome,
    _inline_for,
    _verified_inline,
)
from herder.store.completions import CompletionsMixin
from herder.store.tx import _Tx

T = TypeVar("T")


_OFFER_TARGET = task_target(TaskEvent.OFFER).value


def _window_size(n: int) -> int:
    """Ready tasks read per claim of ``n``: room to choose what fits together and by share."""
    return n + min(n, 100) + 8


class ClaimsMixin(CompletionsMixin):
    """Part of :class:`herder.store.Store`: claims and acks."""

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
            sql = self._sql
            agent = t.cur.execute(sql.claim_agent, (t.at, agent_id)).fetchone()
            if agent is None:
                raise NotFound(f"agent {agent_id} not found")
            state, drain = agent[3], agent[4]
            drain = bool(drain)
            out = ClaimOutcome()
            if inline:
                self._insert_blobs(t, inline)
            if completions:
                out.results = self._complete_many(t, completions, agent_id)
            for attempt_id in acks:
                self._ack(t, attempt_id, None, agent_id)
            if max_tasks > 0 and state != "draining" and not drain:
                self._enforce_pool_acls(t, agent[12])  # seeds/002: forbidden work rejected first
                out.offers = self._offer(t, agent_id, agent, max_tasks)
            self._finish(t)  # events, then the stage counters (they may set t.woke)
            out.woke = t.woke
            out.drain = drain
            return out

        return self._write(tx)

    def _agent_snapshot(self, t: _Tx, agent_id: str, row: Sequence[Any]) -> AgentSnapshot:
        """The claiming agent as the scheduler sees it (``claim_agent``'s row)."""
        sql = self._sql
        tags, cpus, ram_mb, _state, _drain, slots, gpus, max_ram, max_load, usage = row[:10]
        owners, pools = row[10], row[11]
        load_1m = None
        if max_load is not None:
            load_1m = (sql.load(usage) or {}).get("load_1m")
        held = t.cur.execute(sql.agent_held, (agent_id,)).fetchone()
        return AgentSnapshot(
            slots=slots,
            cpus=cpus,
            ram_mb=ram_mb,
            gpus=gpus,
            tags=frozenset(sql.load(tags) or ()),
            max_ram_mb=max_ram,
            max_load=max_load,
            load=None if load_1m is None else float(load_1m),
            held=int(held[0]),
            used_cpus=int(held[1]),
            used_ram_mb=int(held[2]),
            used_gpus=int(held[3]),
            accept_owners=frozenset(sql.load(owners) or ()),
            accept_pools=frozenset(sql.load(pools) or ()),
        )

    def _offer(self, t: _Tx, agent_id: str, agent_row: Sequence[Any], n: int) -> list[Offer]:
        sql, now, cur = self._sql, t.now, t.cur
        ts, load = sql.ts, sql.load
        agent = self._agent_snapshot(t, agent_id, agent_row)
        if agent.overloaded:
            return []
        window = cur.execute(
            sql.offer_window,
            {
                "tags": sql.tags_param(sorted(agent.tags)),
                "negated": sql.tags_param([f"!{tag}" for tag in sorted(agent.tags)]),
                "cpus": agent.cpu_capacity,
                "gpus": agent.gpus,
                "ram": agent.ram_capacity,
                "n": _window_size(n),
                "agent_id": agent_id,
                "now": t.at,
                "live_since": ts(now - timedelta(seconds=self.offline_after_s)),
                "retry_before": ts(
                    now - timedelta(seconds=self.placement_policy.retry_elsewhere_s)
                ),
                **accepts_params(
                    sorted(agent.accept_owners), sorted(agent.accept_pools), sql.tags_param
                ),
            },
        ).fetchall()
        if not window:
            return []
        # (id, job_id, priority, share_key, cpus, ram_mb, gpus, owner, pool)
        candidates = [
            Candidate(
                id=r[0],
                job_id=r[1],
                priority=r[2],
                share_key=r[3],
                cpus=r[4],
                ram_mb=r[5],
                gpus=r[6],
                owner=r[7] or "",
                pool=r[8],
            )
            for r in window
        ]
        shares = self._share_snapshot(t, candidates)
        picks = schedule(candidates, agent, shares, n)
        if not picks:
            return []
        self._note_picks(picks)
        place = {c.id: i for i, c in enumerate(picks)}
        rows = cur.execute(sql.offer_tasks(len(picks)), [agent_id, t.at, *place]).fetchall()
        if not rows:
            return []
        # (id, job_id, priority, attempt_count, command, env, requires, outputs, timeout_s,
        #  cpus, ram_mb, gpus, progress_pattern, stuck_timeout_s), in the scheduler's order
        rows.sort(key=lambda r: place[r[0]])
        ack_deadline = now + timedelta(seconds=self.ack_timeout_s)
        lease_expires = now + timedelta(seconds=self.lease_s)
        ack_db, lease_db = ts(ack_deadline), ts(lease_expires)
        tokens = [secrets.token_hex(16) for _ in rows]
        flat: list[Any] = []
        for r, token in zip(rows, tokens, strict=True):
            flat += (r[0], r[3], agent_id, token, t.at, ack_db, lease_db)
        attempt_of = dict(
            (task_id, aid) for aid, task_id in cur.execute(sql.insert_attempts(len(rows)), flat)
        )
        requires = [load(r[6]) or [] for r in rows]
        small: dict[str, bytes] = {}
        if any(requires):
            small = self._small_blobs(t, {x["digest"] for req in requires for x in req})
        offers = []
        target = _OFFER_TARGET
        for r, token, req in zip(rows, tokens, requires, strict=True):
            task_id, job_id = r[0], r[1]
            aid = attempt_of[task_id]
            t.event(
                "task.offer",
                job_id=job_id,
                task_id=task_id,
                attempt_id=aid,
                agent_id=agent_id,
                from_state=TaskState.QUEUED.value,
                to_state=target,
            )
            # The task's columns were validated at submission: no second validation here.
            offers.append(
                Offer.model_construct(
                    attempt_id=aid,
                    token=token,
                    task_id=task_id,
                    job_id=job_id,
                    href=views.task_href(task_id),
                    command=load(r[4]),
                    env=load(r[5]),
                    requires=[RequiredFile.model_validate(x) for x in req] if req else [],
                    outputs=load(r[7]),
                    timeout_s=r[8],
                    cpus=r[9],
                    ram_mb=r[10],
                    gpus=r[11],
                    progress_pattern=r[12],
                    stuck_timeout_s=r[13],
                    lease_expires_at=lease_expires,
                    ack_deadline=ack_deadline,
                    inline=_inline_for(req, small) if small else {},
                )
            )
        # The first offer of a job starts it (jobs known to have left queued are skipped).
        left = self._left_queued
        fresh = sorted({r[1] for r in rows if r[1] not in left})
        for jid in fresh:
            if cur.execute(sql.job_start, (t.at, jid)).fetchone() is not None:
                t.event(
                    f"job.{JobEvent.START.value}",
                    job_id=jid,
                    from_state=JobState.QUEUED.value,
                    to_state=JobState.RUNNING.value,
                    reason="first task offered",
                )
        if fresh:
            t.after_commit.append(lambda: self._note_left_queued(fresh))
        return offers

    def _note_left_queued(self, job_ids: Sequence[int]) -> None:
        """After commit: these jobs are running or beyond (a job never returns to queued)."""
        if len(self._left_queued) > 100_000:
            self._left_queued.clear()
        self._left_queued.update(job_ids)

    def ack(self, attempt_id: int, token: str) -> None:
        """The agent started the offered attempt. Raises StaleAttempt if it is not current."""

        def tx(t: _Tx) -> None:
            if not self._ack(t, attempt_id, token, None):
                raise StaleAttempt(f"attempt {attempt_id} is not current")

        self._write(tx)

    def _ack(self, t: _Tx, attempt_id: int, token: str | None, agent_id: str | None) -> bool:
        row = self._current_attempt(t, attempt_id)
        if (
            row is None
            or not self._fenced(row, token, agent_id, _ACTIVE)
            or row.state not in _ACTIVE
        ):
            return False
        if row.task_state == TaskState.RUNNING.value:
            return True  # acknowledged already
        lease = t.now + timedelta(seconds=self.lease_s)
        sql = self._sql
        done = t.cur.execute(sql.ack_task, (t.at, row.task_id, row.number)).fetchone()
        if done is None:
            return False
        t.cur.execute(sql.ack_attempt, (t.at, sql.ts(lease), attempt_id))
        t.event(
            f"task.{TaskEvent.ACK.value}",
            job_id=row.job_id,
            task_id=row.task_id,
            attempt_id=attempt_id,
            agent_id=row.agent_id,
            from_state=TaskState.OFFERED.value,
            to_state=task_target(TaskEvent.ACK).value,
        )
        return True
