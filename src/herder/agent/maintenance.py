"""The masters' maintenance, run by an agent in autonomous mode (DESIGN §5, §6; issue 9).

When every master is down nobody else reaps: the leases of agents that die
meanwhile would never expire. An agent in autonomous mode therefore runs the
code a master's reaper runs (``Store.maintain``, then retention's
``Store.prune_due``) under the same maintenance lock, as ``agent:<id>``.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

log = logging.getLogger("herder.agent")

# The masters' maintenance cadence and lock TTL (MasterConfig), and the same
# environment variables that set them on a master.
REAP_INTERVAL_S = 1.0
REAP_INTERVAL_ENV = "HERDER_REAP_INTERVAL_S"
MAINTENANCE_TTL_ENV = "HERDER_MAINTENANCE_TTL_S"


def env_seconds(name: str, default: float) -> float:
    value = os.environ.get(name)
    if not value:
        return default
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if seconds <= 0:
        log.warning("event=bad_setting %s=%r using=%g", name, value, default)
        return default
    return seconds


class AutonomousMaintenance:
    """The masters' maintenance, run by an agent in autonomous mode (DESIGN §5, §6).

    Every ``interval_s``: if a read-write master is listed up in the directory
    (its heartbeat, judged by the database clock), let the lock go and leave
    maintenance to it; else ``Store.maintain(holder, ttl_s)`` (reap, taking
    or renewing the lock in the same transaction, exactly as a master does)
    and, while holding it, ``Store.prune_due``.
    """

    def __init__(self, store: Any, holder: str, interval_s: float, ttl_s: float) -> None:
        self.store = store
        self.holder = holder
        self.interval_s = interval_s
        self.ttl_s = ttl_s
        self.holding = False
        self.reaped = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name="herder-autonomous-maintenance", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.round()

    def round(self) -> None:
        try:
            if any(m.role == "read-write" for m in self.store.list_masters()):
                self._let_go("masters_up")
                return
            n = self.store.maintain(self.holder, self.ttl_s)
            if (n is not None) != self.holding:
                self.holding = n is not None
                log.warning(
                    "event=maintenance_lock %s holder=%s mode=autonomous",
                    "acquired" if self.holding else "lost",
                    self.holder,
                )
            if n:
                self.reaped += n
                log.info("event=reaped tasks=%d holder=%s", n, self.holder)
            if n is not None:
                self.store.prune_due(self.holder, self.ttl_s)
        except Exception as exc:  # the database may be away too: the next round tries again
            log.warning("event=autonomous_maintenance_failed error=%r", str(exc)[:300])

    def _let_go(self, reason: str) -> None:
        if not self.holding:
            return
        self.holding = False
        try:
            self.store.release_lock(self.holder)
        except Exception as exc:  # it lapses after its TTL anyway
            log.debug("event=maintenance_release_failed error=%r", str(exc)[:300])
        log.warning("event=maintenance_lock released holder=%s reason=%s", self.holder, reason)

    def stop(self, reason: str) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)
        self._let_go(reason)
