"""Finding masters, backing off, and autonomous mode for the agent (DESIGN §6; seeds/000).

The agent's loops talk to one :class:`ModalClient`. It has the methods of
:class:`herder.client.HerderClient` the agent uses and routes each call:

- **master mode**: through a :class:`HerderClient` built on a
  :class:`~herder.client.discovery.MasterDiscovery` (configured list, then the
  DNS alias, then the master directory), which tries every master address
  before it gives up. When a call finds every master down, the client starts
  a *round* of capped binary exponential backoff with full jitter
  (:class:`~herder.client.discovery.Backoff`), shared by all the agent's
  threads: until the round's wait is over, calls fail at once with
  :class:`NoMasterAvailable` whose ``retry_after`` is the rest of the wait, so
  the loops sleep and exactly one probe per round reaches the network. Each
  round is logged ``event=all_masters_down wait_s=… ceiling_s=… round=…`` and
  forgets the discovery's cached DNS and directory answers. After a reconnect
  the failures the client recorded are reported to the master that answered
  (``POST /api/v1/masters/{id}/failures``).
- **autonomous mode**: when every master has failed and the configuration
  allows self-assignment and gives the database URL, the calls go to
  :class:`StoreClient`, which claims, completes, heartbeats (``mode=
  "autonomous"``), stores logs and blobs through :class:`herder.store.Store`,
  the very code a master runs. While no read-write master is listed up in the
  master directory, it also does the masters' maintenance
  (:class:`AutonomousMaintenance`: ``Store.maintain`` reaps under the
  maintenance lock, held as ``agent:<id>``, then retention's ``prune_due``),
  at the masters' cadence, so the leases of agents that die meanwhile are
  reaped. It lets the lock go as soon as a master is listed again or the
  agent leaves autonomous mode (or the lock's TTL lapses if it dies).

Return to master mode (``return_policy``): ``per-task`` probes the masters
(one ``GET /health`` with a short timeout) before each claim that asks for
new work; ``interval:S`` probes every S seconds; ``never`` waits for
:meth:`ModalClient.request_master_mode` (talkback ``mode``, SIGUSR1). On the
switch, the claim that triggered it (carrying the pending completions) goes to
the master, so completions are delivered there first, then claims resume.

Moving back: every ``rehome_s`` seconds the client forgets which master last
answered, so the next request starts again from the discovery's order: the
first configured master when it is back, else the DNS answers (shuffled per
agent, so agents spread over equal masters).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from herder.agent.maintenance import (
    MAINTENANCE_TTL_ENV,
    REAP_INTERVAL_ENV,
    REAP_INTERVAL_S,
    AutonomousMaintenance,
    env_seconds,
)
from herder.api_models import (
    AgentRegister,
    AgentView,
    ClaimRequest,
    ClaimResponse,
    Completion,
    CompletionResult,
    Heartbeat,
    HeartbeatResponse,
    LogChunk,
)
from herder.core.rules import DEFAULT_MAINTENANCE_TTL_S

log = logging.getLogger("herder.agent")

Mode = Literal["master", "autonomous"]
T = TypeVar("T")

AUTONOMOUS_POLL_S = 0.25  # how often an idle autonomous claim re-checks the queue
AUTONOMOUS_WAIT_MAX_S = 2.0  # longest "long-poll" of an autonomous claim (keeps probes timely)
PROBE_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class ReturnPolicy:
    """``per-task`` | ``interval:SECONDS`` | ``never``."""

    kind: Literal["per-task", "interval", "never"]
    interval_s: float = 0.0

    @classmethod
    def parse(cls, text: str) -> ReturnPolicy:
        t = text.strip().lower()
        if t in ("per-task", "per_task", "pertask"):
            return cls("per-task")
        if t == "never":
            return cls("never")
        if t.startswith("interval:"):
            try:
                s = float(t.split(":", 1)[1])
            except ValueError:
                s = -1.0
            if s > 0:
                return cls("interval", s)
        raise ValueError(f"expected per-task, interval:SECONDS or never, got {text!r}")

    def __str__(self) -> str:
        return f"interval:{self.interval_s:g}" if self.kind == "interval" else self.kind


# ------------------------------------------------------------ store client


def _translate(exc: Exception) -> Exception:
    """A store error as the client error the agent's loops understand."""
    from herder.client import ApiError, StaleAttemptError
    from herder.errors import HerderError, StaleAttempt

    if isinstance(exc, StaleAttempt):
        return StaleAttemptError(409, exc.code, str(exc))
    if isinstance(exc, HerderError):
        return ApiError(exc.status, exc.code, str(exc))
    return exc


class StoreClient:
    """The agent's client methods, backed by the database (autonomous mode)."""

    def __init__(self, db_url: str, lease_s: float = 30.0, ack_timeout_s: float = 30.0) -> None:
        from herder.store import Store

        self.store = Store.open(
            db_url, migrate=False, lease_s=lease_s, ack_timeout_s=ack_timeout_s, pool_size=4
        )
        self._stop = threading.Event()
        self._maint_lock = threading.Lock()
        self._maint_allowed = True  # off in master mode: a late autonomous call starts nothing
        self.maintenance: AutonomousMaintenance | None = None

    def _maintain_as(self, agent_id: str) -> None:
        """Start the maintenance thread once the agent's id is known (first call)."""
        if self.maintenance is not None or not self._maint_allowed:
            return
        with self._maint_lock:
            if self.maintenance is None and self._maint_allowed and not self._stop.is_set():
                m = AutonomousMaintenance(
                    self.store,
                    f"agent:{agent_id}",
                    env_seconds(REAP_INTERVAL_ENV, REAP_INTERVAL_S),
                    env_seconds(MAINTENANCE_TTL_ENV, DEFAULT_MAINTENANCE_TTL_S),
                )
                m.start()
                self.maintenance = m

    def stop_maintenance(self, reason: str) -> None:
        """Leave maintenance to the masters (leaving autonomous mode); the lock is let go."""
        with self._maint_lock:
            self._maint_allowed = False
            m, self.maintenance = self.maintenance, None
        if m is not None:
            m.stop(reason)

    def allow_maintenance(self) -> None:
        """Back in autonomous mode: the next call starts maintenance again."""
        with self._maint_lock:
            self._maint_allowed = True

    def _do(self, fn: Callable[..., T], *args: Any) -> T:
        try:
            return fn(*args)
        except Exception as exc:
            new = _translate(exc)
            if new is exc:
                raise
            raise new from exc

    def register_agent(self, req: AgentRegister) -> AgentView:
        view, _ = self._do(self.store.register_agent, req.model_copy(update={"mode": "autonomous"}))
        return view

    def claim(self, agent_id: str, req: ClaimRequest) -> ClaimResponse:
        self._maintain_as(agent_id)
        out = self._do(self.store.claim, agent_id, req.max_tasks, req.completions, req.acks)
        results, offers = out.results, out.offers
        # A short "long-poll": re-check the claim index until work or the wait is over.
        deadline = time.monotonic() + min(req.wait_s, AUTONOMOUS_WAIT_MAX_S)
        while not offers and req.max_tasks > 0 and not out.drain and not self._stop.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._stop.wait(min(AUTONOMOUS_POLL_S, left))
            if self.store.has_claimable_work():
                out = self._do(self.store.claim, agent_id, req.max_tasks, [], [])
                offers = out.offers
        return ClaimResponse(
            offers=offers, completions=results, lease_s=self.store.lease_s, drain=out.drain
        )

    def complete(self, c: Completion, agent_id: str | None = None) -> CompletionResult:
        res, _ = self._do(self.store.complete, c, agent_id)
        return res

    def ack(self, attempt_id: int, token: str) -> None:
        self._do(self.store.ack, attempt_id, token)

    def append_log(self, attempt_id: int, token: str, chunks: list[LogChunk]) -> None:
        self._do(self.store.append_log, attempt_id, token, chunks)

    def heartbeat(self, agent_id: str, hb: Heartbeat) -> HeartbeatResponse:
        self._maintain_as(agent_id)
        return self._do(
            self.store.heartbeat, agent_id, hb.model_copy(update={"mode": "autonomous"})
        )

    def missing_blobs(self, digests: list[str]) -> list[str]:
        return self._do(self.store.missing_blobs, list(digests))

    def put_blob(self, digest: str, data: bytes) -> Any:
        return self._do(self.store.put_blob, digest, data)

    def download_blob(self, digest: str, dest: Path) -> int:
        from herder.client import BlobDigestError

        data = self._do(self.store.get_blob, digest)
        actual = hashlib.sha256(data).hexdigest()
        if actual != digest:
            raise BlobDigestError(digest, actual)
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, dest)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return len(data)

    def close(self) -> None:
        self._stop.set()
        self.stop_maintenance("stopping")
        self.store.close()


# ------------------------------------------------------------ modal client


class ModalClient:
    """Routes the agent's calls to the masters or, in autonomous mode, to the database."""

    def __init__(
        self,
        masters: Sequence[str],
        *,
        dns_name: str | None = None,
        resolver: str | None = None,
        srv: bool | None = None,
        timeout: float = 30.0,
        token: str | None = None,
        verify: bool | str = True,
        backoff_base_s: float = 0.25,
        backoff_max_s: float = 30.0,
        self_assign: bool = False,
        db_url: str | None = None,
        return_policy: ReturnPolicy | str = "per-task",
        rehome_s: float = 60.0,
        reporter: str | None = None,
        lease_s: Callable[[], float] = lambda: 30.0,
        on_mode_change: Callable[[Mode], None] | None = None,
    ) -> None:
        from herder.client import HerderClient
        from herder.client.discovery import Backoff, MasterDiscovery

        self.discovery = MasterDiscovery(
            list(masters), dns_name=dns_name, resolver=resolver, srv=srv
        )
        self.http = HerderClient(
            discovery=self.discovery, timeout=timeout, token=token, verify=verify
        )
        self._probe = HerderClient(
            discovery=self.discovery,
            timeout=min(timeout, PROBE_TIMEOUT_S),
            token=token,
            verify=verify,
        )
        self.backoff = Backoff(backoff_base_s, backoff_max_s)
        self.self_assign = bool(self_assign and db_url)
        self.db_url = db_url
        self.policy = (
            return_policy
            if isinstance(return_policy, ReturnPolicy)
            else ReturnPolicy.parse(return_policy)
        )
        self.rehome_s = rehome_s
        self.reporter = reporter
        self._lease_s = lease_s
        self.on_mode_change = on_mode_change
        self._lock = threading.Lock()
        self._probe_lock = threading.Lock()
        self._report_lock = threading.Lock()
        self._mode: Mode = "master"
        self._store: StoreClient | None = None
        self._next_try = 0.0  # monotonic: no master call before this (backoff round)
        self._round_at = -1.0  # when the current backoff round started
        self._down = False  # every master failed, no success since
        self._last_probe = 0.0
        self._last_report = 0.0
        self._last_rehome = time.monotonic()
        self._want_master = False  # request_master_mode() was called
        self.rounds = 0

    # ----------------------------------------------------------- state

    @property
    def mode(self) -> Mode:
        return self._mode

    def request_master_mode(self) -> None:
        """Leave autonomous mode now (talkback ``mode``, SIGUSR1). Safe from a signal handler.

        The next call goes to the masters (no probe); if every master is still
        down, the agent falls back to autonomous mode again.
        """
        self._want_master = True
        if self._mode == "autonomous":
            self._mode = "master"  # one assignment: no lock taken in a signal handler
            threading.Thread(target=self._announce_return, daemon=True).start()

    def _announce_return(self) -> None:
        self._want_master = False
        self._next_try = 0.0
        self._leave_maintenance()
        log.warning("event=mode_changed mode=master reason=requested policy=%s", self.policy)
        if self.on_mode_change is not None:
            with contextlib.suppress(Exception):
                self.on_mode_change("master")

    def _set_mode(self, mode: Mode, reason: str) -> None:
        with self._lock:
            if self._mode == mode:
                return
            self._mode = mode
        log.warning("event=mode_changed mode=%s reason=%s policy=%s", mode, reason, self.policy)
        if mode == "master":
            self._leave_maintenance()
        elif self._store is not None:
            self._store.allow_maintenance()
        if self.on_mode_change is not None:
            with contextlib.suppress(Exception):
                self.on_mode_change(mode)

    def _leave_maintenance(self) -> None:
        store = self._store
        if store is not None:
            store.stop_maintenance("master_mode")

    def _store_client(self) -> StoreClient:
        with self._lock:
            if self._store is None:
                assert self.db_url is not None
                self._store = StoreClient(self.db_url, lease_s=self._lease_s())
            return self._store

    # ---------------------------------------------------------- routing

    def _call(self, name: str, *args: Any, new_work: bool = False) -> Any:
        from herder.client import NoMasterAvailable

        if self._mode == "autonomous":
            if not self._should_return(new_work):
                return getattr(self._store_client(), name)(*args)
            self._set_mode("master", self._return_reason())
        now = time.monotonic()
        if now < self._next_try:
            raise NoMasterAvailable("AGENT", name, [], retry_after=max(self._next_try - now, 0.05))
        self._maybe_rehome(now)
        started = time.monotonic()
        try:
            result = getattr(self.http, name)(*args)
        except NoMasterAvailable as exc:
            self._all_down(started, exc)
            if self.self_assign:
                self._set_mode("autonomous", "all_masters_down")
                return getattr(self._store_client(), name)(*args)
            raise
        self._ok()
        return result

    def _all_down(self, started: float, exc: Exception) -> None:
        """Every master failed this call: start a backoff round (once per round)."""
        with self._lock:
            if self._round_at >= started:
                return  # another call already started a round meanwhile
            ceiling = self.backoff.ceiling()
            wait = 0.0 if self.self_assign else self.backoff.next()
            self.rounds += 1
            now = time.monotonic()
            self._round_at = now
            self._next_try = now + wait
            self._down = True
        self.discovery.invalidate()
        log.warning(
            "event=all_masters_down wait_s=%.3f ceiling_s=%.3f round=%d self_assign=%s error=%r",
            wait,
            ceiling,
            self.rounds,
            self.self_assign,
            str(exc)[:300],
        )

    def _ok(self) -> None:
        was_down = self._down
        if was_down:
            with self._lock:
                self._down = False
                self.backoff.reset()
            log.info("event=masters_back preferred=%s", self.http.preferred)
        if self.http.failures and (was_down or time.monotonic() - self._last_report > 1.0):
            self.report_failures()

    def report_failures(self) -> None:
        """Report the masters that failed us to the one that answered (non-blocking)."""
        from herder.client.discovery import report_failures

        if not self._report_lock.acquire(blocking=False):
            return
        try:
            self._last_report = time.monotonic()
            rep = report_failures(self.http, reporter=self.reporter, discovery=self.discovery)
            if rep.sent or rep.error:
                log.info(
                    "event=master_failures_reported sent=%d skipped=%d error=%r",
                    rep.sent,
                    rep.skipped,
                    rep.error,
                )
        except Exception as exc:  # reporting is best effort
            log.debug("event=master_failures_report_failed error=%r", str(exc))
        finally:
            self._report_lock.release()

    def _maybe_rehome(self, now: float) -> None:
        """Every ``rehome_s``: start again from the discovery's order (move back / spread)."""
        if self.rehome_s <= 0 or now - self._last_rehome < self.rehome_s:
            return
        self._last_rehome = now
        # HerderClient has no setter: forgetting the preferred master makes the
        # next request start from the first candidate (the configured master
        # first; DNS answers are shuffled per agent).
        self.http._preferred = None

    def _return_reason(self) -> str:
        return "requested" if self._want_master else f"policy:{self.policy}"

    def _should_return(self, new_work: bool) -> bool:
        if self._want_master:
            self._want_master = False
            return True
        kind = self.policy.kind
        if kind == "never":
            return False
        now = time.monotonic()
        if kind == "per-task":
            if not new_work or now - self._last_probe < 0.2:
                return False
        elif now - self._last_probe < self.policy.interval_s:
            return False
        return self._probe_masters()

    def _probe_masters(self) -> bool:
        """One cheap health request to the candidates; True when a master answered."""
        if not self._probe_lock.acquire(blocking=False):
            return False
        try:
            self._last_probe = time.monotonic()
            self.discovery.invalidate()
            try:
                self._probe.health()
            except Exception as exc:
                log.debug("event=master_probe_failed error=%r", str(exc)[:200])
                self._probe.pop_failures()
                return False
            self._probe.pop_failures()
            return True
        finally:
            self._probe_lock.release()

    # ------------------------------------------------- the agent's client API

    def register_agent(self, req: AgentRegister) -> AgentView:
        view: AgentView = self._call("register_agent", req)
        return view

    def claim(self, agent_id: str, req: ClaimRequest) -> ClaimResponse:
        resp: ClaimResponse = self._call("claim", agent_id, req, new_work=req.max_tasks > 0)
        return resp

    def complete(self, c: Completion) -> CompletionResult:
        res: CompletionResult = self._call("complete", c)
        return res

    def ack(self, attempt_id: int, token: str) -> None:
        self._call("ack", attempt_id, token)

    def append_log(self, attempt_id: int, token: str, chunks: list[LogChunk]) -> None:
        self._call("append_log", attempt_id, token, chunks)

    def heartbeat(self, agent_id: str, hb: Heartbeat) -> HeartbeatResponse:
        resp: HeartbeatResponse = self._call("heartbeat", agent_id, hb)
        return resp

    def missing_blobs(self, digests: Iterable[str]) -> list[str]:
        out: list[str] = self._call("missing_blobs", list(digests))
        return out

    def put_blob(self, digest: str, data: bytes) -> Any:
        return self._call("put_blob", digest, data)

    def download_blob(self, digest: str, dest: Path) -> Any:
        return self._call("download_blob", digest, dest)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.http.close()
        with contextlib.suppress(Exception):
            self._probe.close()
        with contextlib.suppress(Exception):
            self.discovery.close()
        if self._store is not None:
            with contextlib.suppress(Exception):
                self._store.close()


__all__ = ["AutonomousMaintenance", "Mode", "ModalClient", "ReturnPolicy", "StoreClient"]
