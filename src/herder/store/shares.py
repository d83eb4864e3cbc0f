"""Fair share between owners (DESIGN §8): weights, clocks, slot-seconds.

Two halves, both feeding :mod:`herder.core.schedule`:

- **At submission** each task gets a share key, its place in its owner's
  weighted queue (start-time fair queuing): the owner's clock advances by
  ``1 / weight`` per task, from ``max(owner's clock, the farm's clock)``, the
  farm's clock being the share key at the head of the queue. The claim's
  indexed scan orders by ``priority DESC, share_key, id``, so owners' ready
  tasks come interleaved by weight at no cost to the claim.
- **At the claim**, when the window holds more than one owner, the scheduler
  also weighs each owner's slot-seconds over the last ``share_window_s``
  (attempts running, or finished within the window): owners whose tasks run
  longer get fewer picks, so the split converges in slot-seconds, not in
  task counts. That figure is read at most every ``share_refresh_s`` per
  store (a snapshot is all fairness needs), never for a one-owner window.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from herder.core.schedule import DEFAULT_SHARE_WINDOW_S, Candidate, Shares, share_keys
from herder.store.tx import StoreBase, _Tx

DEFAULT_SHARE_REFRESH_S = 5.0
WEIGHT_MAX = 1_000_000.0
_NO_SHARES = Shares()


@dataclass(frozen=True)
class OwnerShare:
    owner: str
    weight: float
    used_s: float  # slot-seconds over the window, as of the last snapshot


class _ShareSql:
    def __init__(self, is_pg: bool) -> None:
        mark = "%s" if is_pg else "?"
        greatest = "GREATEST" if is_pg else "max"
        self.head = (
            "SELECT share_key FROM tasks WHERE state = 'queued' AND placement = 'remote' "
            "ORDER BY priority DESC, share_key, id LIMIT 1"
        )
        self.top_clock = "SELECT coalesce(max(clock), 0) FROM owner_shares"
        # One statement: concurrent submissions of one owner serialise on its row.
        self.advance = (
            f"INSERT INTO owner_shares (owner, weight, clock) VALUES ({mark}, 1, {mark} + {mark}) "
            "ON CONFLICT (owner) DO UPDATE SET clock = "
            f"{greatest}(owner_shares.clock, {mark}) + {mark} / owner_shares.weight "
            "RETURNING clock, weight"
        )
        self.weights = "SELECT owner, weight FROM owner_shares WHERE weight <> 1"
        # A slot is the owner's from the offer (acks come batched, up to a second
        # late: started_at would undercount) to the end of the attempt.
        self.used = (
            "SELECT jobs.owner, attempts.offered_at, attempts.finished_at FROM attempts "
            "JOIN tasks ON tasks.id = attempts.task_id JOIN jobs ON jobs.id = tasks.job_id "
            f"WHERE attempts.offered_at IS NOT NULL AND attempts.finished_at > {mark} "
            "UNION ALL "
            "SELECT jobs.owner, attempts.offered_at, attempts.finished_at FROM attempts "
            "JOIN tasks ON tasks.id = attempts.task_id JOIN jobs ON jobs.id = tasks.job_id "
            "WHERE attempts.state IN ('offered', 'running') AND attempts.finished_at IS NULL "
            "AND attempts.offered_at IS NOT NULL"
        )
        self.set_weight = (
            f"INSERT INTO owner_shares (owner, weight, clock) VALUES ({mark}, {mark}, 0) "
            f"ON CONFLICT (owner) DO UPDATE SET weight = {mark} RETURNING weight"
        )
        self.list = "SELECT owner, weight FROM owner_shares ORDER BY owner"


def _as_dt(value: Any) -> datetime:
    if isinstance(value, datetime):
        return value
    return datetime.fromisoformat(str(value))


class SharesMixin(StoreBase):
    """Part of :class:`herder.store.Store`: owners' weights, clocks and usage."""

    share_window_s: float = DEFAULT_SHARE_WINDOW_S
    share_refresh_s: float = DEFAULT_SHARE_REFRESH_S

    def _shares_init(self) -> None:
        if not hasattr(self, "_share_sql"):
            self._share_sql = _ShareSql(self._is_pg)
            self._share_lock = threading.Lock()
            self._share_cache: tuple[float, Shares] | None = None
            # What this store's picks since that read are expected to use, per owner.
            self._share_charged: dict[str, float] = {}

    # ------------------------------------------------------------ submission

    def _assign_share_keys(self, t: _Tx, owner: str | None, count: int) -> list[float]:
        """Share keys for ``count`` new tasks of ``owner``, advancing its clock (same tx)."""
        self._shares_init()
        q = self._share_sql
        cur = t.cur
        head = cur.execute(q.head).fetchone()
        farm = float(head[0]) if head is not None else float(cur.execute(q.top_clock).fetchone()[0])
        who = owner or ""
        clock, weight = cur.execute(
            q.advance, (who, farm, float(count), farm, float(count))
        ).fetchone()
        step_total = count / (weight if weight > 0 else 1.0)
        start = float(clock) - step_total
        return share_keys(start, float(weight), count)

    # ----------------------------------------------------------------- claim

    def _share_snapshot(self, t: _Tx, candidates: Sequence[Candidate]) -> Shares:
        """Weights and slot-seconds, for a window where owners compete; else nothing."""
        first = candidates[0].owner
        if all(c.owner == first for c in candidates):
            return _NO_SHARES
        self._shares_init()
        with self._share_lock:
            cached = self._share_cache
            fresh = cached is not None and time.monotonic() - cached[0] < self.share_refresh_s
        if cached is None or not fresh:
            base = self._read_shares(t.cur, t.now)
            with self._share_lock:
                self._share_cache = (time.monotonic(), base)
                self._share_charged = {}
        else:
            base = cached[1]
        with self._share_lock:
            charged = dict(self._share_charged)
        if not charged:
            return base
        used = dict(base.used_s)
        for owner, seconds in charged.items():
            used[owner] = used.get(owner, 0.0) + seconds
        return Shares(weights=base.weights, used_s=used, charge_s=base.charge_s)

    def _note_picks(self, picks: Sequence[Candidate]) -> None:
        """Charge what was just offered until the slot-seconds are read again.

        Without it, every claim between two reads would see the same figures
        and give every pick to the same owner (claims mostly pick one task).
        """
        if not picks or not hasattr(self, "_share_lock"):
            return
        with self._share_lock:
            if self._share_cache is None:
                return  # owners have not competed yet: nothing to correct
            base, charged = self._share_cache[1], self._share_charged
            for c in picks:
                charged[c.owner] = charged.get(c.owner, 0.0) + base.charge(c.owner)

    def _read_shares(self, cur: Any, now: datetime) -> Shares:
        q = self._share_sql
        since = now - timedelta(seconds=self.share_window_s)
        naive_now = now.replace(tzinfo=None)
        naive_since = since.replace(tzinfo=None)
        weights = {str(o): float(w) for o, w in cur.execute(q.weights).fetchall()}
        used: dict[str, float] = {}
        ran: dict[str, list[float]] = {}  # durations of finished attempts, for the charge
        for owner, started, finished in cur.execute(q.used, (self._sql.ts(since),)).fetchall():
            start = _as_dt(started).replace(tzinfo=None)
            end = naive_now if finished is None else _as_dt(finished).replace(tzinfo=None)
            key = owner or ""
            seconds = (end - max(start, naive_since)).total_seconds()
            if seconds > 0:
                used[key] = used.get(key, 0.0) + seconds
            if finished is not None:
                ran.setdefault(key, []).append(max((end - start).total_seconds(), 0.0))
        charge = {o: max(sum(d) / len(d), 0.001) for o, d in ran.items() if d}
        if charge:  # owners not seen finishing yet: the farm's mean
            every = [x for d in ran.values() for x in d]
            default = max(sum(every) / len(every), 0.001)
            return Shares(weights=weights, used_s=used, charge_s=charge, pick_charge_s=default)
        return Shares(weights=weights, used_s=used)

    # ----------------------------------------------------------------- API

    def set_owner_weight(self, owner: str, weight: float) -> OwnerShare:
        """An owner's fair-share weight (one transaction); new picks follow it at once."""
        if not (math.isfinite(weight) and 0 < weight <= WEIGHT_MAX):
            raise ValueError(f"weight must be above 0 and at most {WEIGHT_MAX:g}")
        self._shares_init()
        q = self._share_sql

        def tx(t: _Tx) -> float:
            row = t.cur.execute(q.set_weight, (owner, weight, weight)).fetchone()
            t.event("owner.share", reason=f"owner {owner!r}: weight {weight:g}")
            return float(row[0])

        got = self._write(tx)
        with self._share_lock:
            self._share_cache = None
        used = next((o.used_s for o in self.owner_shares() if o.owner == owner), 0.0)
        return OwnerShare(owner=owner, weight=got, used_s=used)

    def owner_shares(self) -> list[OwnerShare]:
        """Every owner with a share row, with slot-seconds over the window."""
        self._shares_init()
        q = self._share_sql

        def tx(t: _Tx) -> list[OwnerShare]:
            shares = self._read_shares(t.cur, t.now)
            rows = t.cur.execute(q.list).fetchall()
            return [
                OwnerShare(owner=str(o), weight=float(w), used_s=shares.used_s.get(str(o), 0.0))
                for o, w in rows
            ]

        return self._write(tx)
