"""The master directory (DESIGN §6): heartbeats, lookups, failure reports."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from herder.api_models import (
    MasterFailureReport,
    MasterFailureView,
    MasterView,
)
from herder.errors import Conflict, NotFound
from herder.store import views
from herder.store.common import (
    MasterStatus,
)
from herder.store.schema import (
    master_failures,
    masters,
)
from herder.store.tx import StoreBase, _Tx


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


class MastersMixin(StoreBase):
    """Part of :class:`herder.store.Store`: the master directory."""

    def master_heartbeat(
        self,
        status: MasterStatus,
        *,
        starting: bool = False,
        state: str = "up",
        same_role: bool = False,
    ) -> None:
        """Upsert a master's directory row: its stats, ``last_heartbeat_at`` = database now.

        ``starting`` resets ``started_at``; ``state="stopped"`` on graceful shutdown.
        ``same_role``: a row of a master of another role is left alone (Conflict):
        a heartbeat relayed for another master (``herder.master.readonly``) never
        turns a read-write master's row into something else.
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
            if same_role:
                upd = upd.where(masters.c.role == status.role)
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
                if same_role:  # the row is there with another role
                    raise Conflict(
                        f"master {status.id} is in the directory with another role",
                        detail={"master": status.id},
                    )
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
