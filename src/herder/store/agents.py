"""Agents: registration, views, drain, wake-up targets."""

from __future__ import annotations

import secrets
from collections.abc import Iterable
from datetime import timedelta

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from herder.api_models import (
    AgentLimits,
    AgentRegister,
    AgentView,
)
from herder.errors import NotFound
from herder.store import views
from herder.store.common import (
    _ACTIVE_ATTEMPT_SQL,
    WakeTarget,
)
from herder.store.schema import (
    agents,
    attempts,
)
from herder.store.tx import StoreBase, _Tx

_AGENT_STATE = sa.select(agents.c.state).where(agents.c.id == sa.bindparam("agent_id"))


class AgentsMixin(StoreBase):
    """Part of :class:`herder.store.Store`: agents."""

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
            "accept_owners": req.accept_owners,  # whose work it takes (herder.core.acl)
            "accept_pools": req.accept_pools,
        }
        if req.mode is not None:
            values["mode"] = req.mode
        values["gpus"] = req.gpus
        # The agent's own flags win when it registers; without them a limit set
        # through the API (set_agent_limits) stays.
        if req.max_ram_mb is not None:
            values["max_ram_mb"] = req.max_ram_mb
        if req.max_load is not None:
            values["max_load"] = req.max_load

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

    def set_agent_limits(self, agent_id: str, limits: AgentLimits) -> AgentView:
        """The agent's own limits (seeds/001), changed at run time: one transaction, one event.

        Only the fields the request names change; null lifts a limit. The
        next claim of the agent follows them.
        """
        changes = limits.model_dump(exclude_unset=True)

        def tx(t: _Tx) -> None:
            if not changes:
                found = t.conn.execute(sa.select(agents.c.id).where(agents.c.id == agent_id))
                if found.first() is None:
                    raise NotFound(f"agent {agent_id} not found")
                return
            upd = (
                sa.update(agents)
                .where(agents.c.id == agent_id)
                .values(**changes)
                .returning(agents.c.id)
            )
            if t.conn.execute(upd).first() is None:
                raise NotFound(f"agent {agent_id} not found")
            said = ", ".join(
                f"{k}={'none' if v is None else v}" for k, v in sorted(changes.items())
            )
            t.event("agent.limits", agent_id=agent_id, reason=said)

        self._write(tx)
        return self.get_agent(agent_id)

    def _running_counts(self, conn: Connection, agent_id: str | None = None) -> dict[str, int]:
        stmt = (
            sa.select(attempts.c.agent_id, sa.func.count())
            .where(sa.text(_ACTIVE_ATTEMPT_SQL))
            .group_by(attempts.c.agent_id)
        )
        if agent_id is not None:
            stmt = stmt.where(attempts.c.agent_id == agent_id)
        return {a: n for a, n in conn.execute(stmt) if a is not None}

    def agent_state(self, agent_id: str) -> str:
        """The agent's state alone (an idle claim's one question); NotFound if unknown."""
        row = self._read(lambda c: c.execute(_AGENT_STATE, {"agent_id": agent_id}).first())
        if row is None:
            raise NotFound(f"agent {agent_id} not found")
        return str(row.state)

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
