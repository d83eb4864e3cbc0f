"""The agent daemon: register, claim, run, report (DESIGN §4, §5, §10).

Threads, not asyncio:

- ``slots`` **slot threads** (started once) take offers from the ready queue,
  stage and run them, upload the outputs, and put the completion in the
  outbox. They never talk to the master about claims;
- the **sender** delivers the outbox *together with a claim for the slots it
  frees* (one round trip, one transaction for all of them). Completions that
  finish while a request is in flight share the next one; a completion waits
  up to ``batch_wait_s`` for young sibling attempts so that short tasks fall
  into step and share requests. A failed delivery is journaled and retried
  with backoff;
- the **poller** claims for idle slots when nothing is being delivered
  (long-polling while the farm is idle);
- the **heartbeat** thread renews leases, reports resource usage, kills the
  attempts the master says to cancel and obeys a drain order;
- the **log shipper** sends new stdout/stderr of running attempts every
  ``log_interval_s`` and sends the acks that no claim carried in time;
- the executor's **cleaner** removes sandboxes once their completion is
  acknowledged, off the critical path.

Acks are piggy-backed: a started attempt's ack waits ``ack_delay_s`` for the
next claim request; a completion implies it. Only attempts that run longer
than that cost one extra ``ack`` request.

Slots are counted under one lock: ``busy`` (offers handed to slots and not
completed yet) plus ``reserved`` (slots asked for by claims in flight) never
exceed ``slots``, and the poller never claims while completions wait in the
outbox, so the agent never over-claims.

Completions the master has not acknowledged can be kept in the journal
(``herder.agent.journal``): a restarted agent delivers them, still fenced,
before it claims anything.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import signal
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, Protocol

from herder.agent.executor import ExecResult, ExecSpec, Execution, Executor, StagingError
from herder.agent.journal import Journal, JournalEntry
from herder.api_models import (
    INLINE_OUTPUT_MAX,
    INLINE_TOTAL_MAX,
    AgentRegister,
    AgentView,
    ClaimRequest,
    ClaimResponse,
    Completion,
    CompletionResult,
    Heartbeat,
    HeartbeatResponse,
    LogChunk,
    Offer,
    Outcome,
    ResourceUsage,
    RunningAttempt,
    decode_inline,
    encode_inline,
)

log = logging.getLogger("herder.agent")

ERROR_MAX = 10_000
LOG_BATCH = 1 << 20  # bytes of one stream per log request


def default_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "state"
    )
    return Path(base) / "herder-agent"


def _ram_mb() -> int:
    try:
        import psutil

        return int(psutil.virtual_memory().total // (1024 * 1024))
    except Exception:  # pragma: no cover
        return 0


@dataclass
class AgentConfig:
    masters: list[str]
    slots: int = field(default_factory=lambda: os.cpu_count() or 1)
    tags: list[str] = field(default_factory=list)
    name: str = field(default_factory=socket.gethostname)
    state_dir: Path = field(default_factory=default_state_dir)
    work_root: Path | None = None  # default: state_dir / "work"
    poll_wait_s: float = 20.0  # long-poll length of an idle claim
    heartbeat_interval_s: float | None = None  # default: lease_s / 3
    drain_timeout_s: float = 30.0  # on SIGTERM, let running tasks finish this long
    kill_grace_s: float = 2.0  # SIGTERM → SIGKILL delay for timeouts and cancels
    log_interval_s: float = 0.5
    ack_delay_s: float = 1.0  # how long an ack may wait for a claim to carry it
    request_timeout_s: float = 30.0
    backoff_base_s: float = 0.25
    backoff_max_s: float = 30.0
    delivery_timeout_s: float = 30.0  # after draining, how long to keep trying to deliver
    journal_min_s: float = 1.0  # journal a completion before sending when the task ran this long
    inline_outputs: bool = True  # small outputs ride in the completion (no blob requests)
    # A completion waits up to batch_wait_s for attempts that started less than
    # batch_young_s ago (likely short ones) to finish, so that one request
    # carries them all (DESIGN §10). Long-running siblings never delay it.
    batch_wait_s: float = 0.01
    batch_young_s: float = 0.1
    token: str | None = None
    verify: bool | str = True
    cpus: int = field(default_factory=lambda: os.cpu_count() or 1)
    ram_mb: int = field(default_factory=_ram_mb)
    env: dict[str, str] | None = None  # base environment of tasks (default: the agent's)
    # Talkback endpoint (herder.agent.talkback): HOST:PORT to listen on (port 0:
    # a free one), None: no endpoint. Its URL and token go to the master at
    # registration; a fresh random token per start unless talkback_token is set.
    talkback: str | None = "127.0.0.1:0"
    talkback_token: str | None = None
    # Finding masters and autonomous mode (herder.agent.autonomous, DESIGN §6).
    dns_name: str | None = None  # DNS alias of the masters (SRV _herder._tcp.<name>, A/AAAA)
    resolver: str | None = None  # HOST:PORT of the DNS server to ask (default: the system's)
    srv: bool | None = None  # None: SRV then A/AAAA; True: SRV only; False: A/AAAA only
    self_assign: bool = False  # claim from the database when every master is down
    db_url: str | None = None  # the farm's database (needed for self-assignment)
    return_policy: str = "per-task"  # per-task | interval:SECONDS | never
    rehome_s: float = 60.0  # start again from the first candidate master this often

    def __post_init__(self) -> None:
        self.state_dir = Path(self.state_dir).expanduser()
        if self.work_root is None:
            self.work_root = self.state_dir / "work"
        self.work_root = Path(self.work_root).expanduser()
        if isinstance(self.masters, str):
            self.masters = [self.masters]
        if self.slots < 1:
            raise ValueError("slots must be at least 1")


class AgentClient(Protocol):
    """What the daemon needs of :class:`herder.client.HerderClient` (fakes in tests)."""

    def register_agent(self, req: AgentRegister) -> AgentView: ...
    def claim(self, agent_id: str, req: ClaimRequest) -> ClaimResponse: ...
    def ack(self, attempt_id: int, token: str) -> None: ...
    def append_log(self, attempt_id: int, token: str, chunks: list[LogChunk]) -> None: ...
    def heartbeat(self, agent_id: str, hb: Heartbeat) -> HeartbeatResponse: ...
    def missing_blobs(self, digests: list[str]) -> list[str]: ...
    def put_blob(self, digest: str, data: bytes) -> Any: ...
    def download_blob(self, digest: str, dest: Path) -> Any: ...
    def close(self) -> None: ...


def _is_stale(exc: BaseException) -> bool:
    from herder.client import StaleAttemptError

    return isinstance(exc, StaleAttemptError)


def _is_outcome_unknown(exc: BaseException) -> bool:
    from herder.client import RequestOutcomeUnknown

    return isinstance(exc, RequestOutcomeUnknown)


def _is_client_error(exc: BaseException) -> bool:
    """An HTTP 4xx answer (other than 409 stale): resending will not help."""
    from herder.client import ApiError

    return isinstance(exc, ApiError) and 400 <= exc.status < 500 and exc.status not in (408, 429)


class Backoff:
    """Capped binary exponential backoff with jitter (seeds/003)."""

    def __init__(self, base: float, cap: float) -> None:
        self.base = base
        self.cap = cap
        self.n = 0

    def next(self, at_least: float | None = None) -> float:
        d = min(self.cap, self.base * (2**self.n))
        self.n = min(self.n + 1, 30)
        delay: float = d / 2 + random.uniform(0, d / 2)
        return max(delay, at_least or 0.0)

    def reset(self) -> None:
        self.n = 0


def _retry_after(exc: BaseException) -> float | None:
    value = getattr(exc, "retry_after", None)
    return float(value) if isinstance(value, int | float) else None


@dataclass
class _Attempt:
    attempt_id: int
    token: str
    offer: Offer | None = None  # None for a completion loaded from the journal
    execution: Execution | None = None
    stale: bool = False  # the master no longer wants it: kill, never report
    unsent: list[LogChunk] = field(default_factory=list)  # log a failed append_log kept
    completion: Completion | None = None
    blobs: dict[str, Path] = field(default_factory=dict)  # output digest -> file with its bytes
    uploaded: bool = True  # False: the master may lack some of ``blobs``
    journaled: bool = False
    sandbox: Path | None = None  # to remove once delivered (journal entries)

    @classmethod
    def of(cls, offer: Offer) -> _Attempt:
        return cls(offer.attempt_id, offer.token, offer)

    @property
    def id(self) -> int:
        return self.attempt_id


@dataclass
class _Reservation:
    """Slots held in ``Agent._reserved`` for ``claims`` requests in flight.

    Normally one claim holds one reservation. A talkback ``wake`` joins the
    parked long-poll's reservation instead of taking a second one: both
    requests may then return offers, and they share ``n`` first come, first
    served (plus slots free at that moment); offers beyond that are handed
    back at once (``released``). The last request to finish returns what is
    left of ``n``. So ``busy + reserved <= slots`` always holds.
    """

    n: int
    claims: int = 1


class Agent:
    def __init__(
        self,
        config: AgentConfig,
        client: AgentClient | None = None,
        executor: Executor | None = None,
    ) -> None:
        self.config = config
        self._modal: Any = None  # herder.agent.autonomous.ModalClient when we built the client
        self._hb_now = threading.Event()  # heartbeat at once (the mode changed)
        if client is None:
            from herder.agent.autonomous import ModalClient

            client = self._modal = ModalClient(
                config.masters,
                dns_name=config.dns_name,
                resolver=config.resolver,
                srv=config.srv,
                timeout=config.request_timeout_s,
                token=config.token,
                verify=config.verify,
                backoff_base_s=config.backoff_base_s,
                backoff_max_s=config.backoff_max_s,
                self_assign=config.self_assign,
                db_url=config.db_url,
                return_policy=config.return_policy,
                rehome_s=config.rehome_s,
                reporter=f"agent:{config.name}",
                lease_s=lambda: self.lease_s,
                on_mode_change=lambda _mode: self._hb_now.set(),
            )
        self.client: AgentClient = client
        assert config.work_root is not None
        self.executor = executor or Executor(
            config.work_root,
            config.state_dir / "blobs",
            lambda digest, dest: self.client.download_blob(digest, dest),
            base_env=config.env,
            kill_grace_s=config.kill_grace_s,
        )
        self.journal = Journal(config.state_dir / "journal")
        self.agent_id: str | None = None
        self.lease_s = 30.0
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)  # slot counts changed (poller, drain)
        self._send_cond = threading.Condition(self._lock)  # the outbox gained work
        self._slot_cond = threading.Condition(self._lock)  # an offer is ready for a slot
        self._busy = 0  # offers handed to slots and not completed yet
        self._reserved = 0  # slots asked for by claims in flight
        self._attempts: dict[int, _Attempt] = {}
        self._acks: dict[int, float] = {}  # attempt id -> when it must be sent
        self._ready: deque[Offer] = deque()  # offers waiting for a slot thread
        self._outbox: list[_Attempt] = []  # completions waiting to be delivered
        self._outbox_since = 0.0  # when the oldest outbox entry arrived
        self._started: dict[int, float] = {}  # running attempt -> when its slot took it
        self._sending = False  # the sender has a request in flight
        self._stop = threading.Event()  # stop claiming (drain)
        self._halt = threading.Event()  # stop everything
        self._drain_until = math.inf  # monotonic deadline for running tasks once stopping
        self._signals_seen = 0
        self._threads: list[threading.Thread] = []
        self.stats = {"claims": 0, "completed": 0, "stale": 0, "acks_sent": 0, "journaled": 0}
        # Talkback (herder.agent.talkback): the poller's parked long-poll, and
        # whether a wake asked the poller to cut its backoff short.
        self._parked: _Reservation | None = None
        self._woken = False
        self.talkback: Any = None  # TalkbackServer while running

    # ------------------------------------------------------------- lifecycle

    def request_stop(self, timeout: float | None = None) -> None:
        """Stop claiming new work and drain (safe from a signal handler).

        Running tasks get ``timeout`` seconds (default ``drain_timeout_s``;
        ``math.inf``: as long as they need) to finish; then they are killed
        and handed back. A later call can only shorten that.
        """
        if timeout is None:
            timeout = self.config.drain_timeout_s
        self._drain_until = min(self._drain_until, time.monotonic() + timeout)
        self._stop.set()
        # Never block in a signal handler: notify the condition from a thread.
        threading.Thread(target=self._notify, daemon=True).start()

    def on_signal(self) -> None:
        """SIGTERM/SIGINT: the first drains (``drain_timeout_s``); a second one hands back now."""
        self._signals_seen += 1
        self.request_stop(self.config.drain_timeout_s if self._signals_seen == 1 else 0.0)

    # ------------------------------------------------ master / autonomous mode

    @property
    def mode(self) -> str:
        """``"master"`` or ``"autonomous"`` (claiming from the database itself, DESIGN §6)."""
        return str(getattr(self._modal, "mode", "master"))

    def request_master_mode(self) -> None:
        """Leave autonomous mode now (talkback ``mode``, SIGUSR1; safe from a signal handler).

        The next request goes to the masters; should every master still be
        down, the agent falls back to autonomous mode again.
        """
        if self._modal is not None:
            self._modal.request_master_mode()
        self._hb_now.set()

    def _notify(self) -> None:
        with self._cond:
            self._cond.notify_all()
            self._send_cond.notify_all()
            self._slot_cond.notify_all()

    def run(self) -> int:
        """Register, deliver the journal, work until stopped, drain, deliver. Returns 0."""
        cfg = self.config
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        journaled = self.journal.load()
        purged = self.executor.purge_stale(keep={e.attempt_id for e in journaled})
        if purged:
            log.info("event=purged_sandboxes count=%d", purged)
        self._start_talkback()
        if not self.register():
            self._halt.set()
            self._stop_talkback()
            return 0
        self._restore_journal(journaled)
        for i in range(cfg.slots):
            self._start_thread(f"herder-slot-{i}", self._slot_loop)
        self._start_thread("herder-send", self._send_loop)
        self._start_thread("herder-poll", self._poll_loop)
        self._start_thread("herder-heartbeat", self._heartbeat_loop)
        self._start_thread("herder-logs", self._log_loop)
        try:
            while not self._stop.wait(0.5):
                pass
        finally:
            self._drain()
        return 0

    def _start_thread(self, name: str, target: Callable[[], None]) -> None:
        t = threading.Thread(target=self._guard(target), name=name, daemon=True)
        self._threads.append(t)
        t.start()

    def _guard(self, target: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                target()
            except Exception:
                log.exception("event=thread_crashed thread=%s", threading.current_thread().name)
                self.request_stop()

        return run

    def _drain(self) -> None:
        cfg = self.config
        log.info(
            "event=draining running=%d timeout_s=%g",
            self._busy,
            max(self._drain_until - time.monotonic(), 0.0),
        )
        with self._cond:
            self._cond.notify_all()
            while self._busy > 0 and time.monotonic() < self._drain_until:
                left = self._drain_until - time.monotonic()
                self._cond.wait(min(0.2, max(left, 0.01)))
            still = self._busy
        if still:
            log.warning("event=drain_timeout killing=%d", still)
            self.executor.kill_all("released", "agent shutting down (drain timeout)")
        # Slots now report (claims with max_tasks=0); the sender delivers, retrying
        # with backoff. Whatever cannot be delivered in time stays in the journal.
        deadline = time.monotonic() + cfg.delivery_timeout_s + cfg.kill_grace_s
        with self._cond:
            while (self._busy or self._outbox or self._sending) and time.monotonic() < deadline:
                self._cond.wait(min(0.1, max(deadline - time.monotonic(), 0.01)))
            undelivered = [a for a in self._attempts.values() if a.completion is not None]
            running = [a.id for a in self._attempts.values() if a.completion is None]
        for att in undelivered:
            self._journal(att)
        if undelivered:
            log.warning(
                "event=undelivered_journaled attempts=%s journal=%s",
                [a.id for a in undelivered],
                self.journal.root,
            )
        if running:
            log.error("event=attempts_abandoned attempts=%s", running)
        self._halt.set()
        self._notify()
        for t in self._threads:
            if t.name != "herder-poll":
                t.join(timeout=2)
        # The poller may sit in a long-poll; it hands back whatever arrives late.
        for t in self._threads:
            if t.name == "herder-poll":
                t.join(timeout=1.0)
        if not self.executor.cleaner.flush(timeout=10.0):
            log.warning("event=cleanup_pending count=%d", self.executor.cleaner.pending)
        self._stop_talkback()
        log.info("event=stopped stats=%s", json.dumps(self.stats))

    # -------------------------------------------------------------- journal

    def _journal(self, att: _Attempt) -> None:
        """Write ``att``'s completion to the journal (once; failures are logged)."""
        if att.journaled or att.completion is None:
            return
        entry = JournalEntry(
            completion=att.completion,
            blobs={d: str(p) for d, p in att.blobs.items()},
            agent_id=self.agent_id,
            task_id=att.offer.task_id if att.offer is not None else None,
        )
        try:
            self.journal.write(entry)
        except OSError as exc:
            log.error("event=journal_write_failed attempt=%d error=%r", att.id, str(exc))
            return
        att.journaled = True
        self.stats["journaled"] += 1
        log.debug("event=journaled attempt=%d", att.id)

    def _restore_journal(self, entries: list[JournalEntry]) -> None:
        """Queue the completions an earlier run could not deliver (before any claim)."""
        atts = []
        for e in entries:
            att = _Attempt(e.attempt_id, e.completion.token, completion=e.completion)
            att.blobs = {d: Path(p) for d, p in e.blobs.items()}
            att.uploaded = not att.blobs
            att.journaled = True
            att.sandbox = self.executor.sandbox_path(e.attempt_id)
            atts.append(att)
        if not atts:
            return
        log.info("event=journal_replay attempts=%s", [a.id for a in atts])
        with self._cond:
            for att in atts:
                self._attempts[att.id] = att
            self._outbox.extend(atts)
            self._outbox_since = time.monotonic()
            self._send_cond.notify()

    # ---------------------------------------------------------- registration

    def _state_file(self) -> Path:
        return self.config.state_dir / "agent.json"

    def _load_state(self) -> dict[str, Any]:
        try:
            data = json.loads(self._state_file().read_text())
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def _save_state(self, data: dict[str, Any]) -> None:
        path = self._state_file()
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, path)

    def register(self) -> bool:
        """Register (keeping the saved id); retry until it works or stop. False if stopped."""
        from herder import __version__

        cfg = self.config
        state = self._load_state()
        saved = state.get("agent_id")
        req = AgentRegister(
            agent_id=saved if isinstance(saved, str) else None,
            name=cfg.name,
            hostname=socket.gethostname(),
            slots=cfg.slots,
            tags=list(cfg.tags),
            cpus=max(1, cfg.cpus),
            ram_mb=max(0, cfg.ram_mb),
            version=__version__,
            talkback_url=self.talkback.url if self.talkback is not None else None,
            talkback_token=self.talkback.token if self.talkback is not None else None,
        )
        backoff = Backoff(cfg.backoff_base_s, cfg.backoff_max_s)
        while not self._stop.is_set():
            try:
                view = self.client.register_agent(req)
            except Exception as exc:
                delay = backoff.next(_retry_after(exc))
                log.warning("event=register_failed error=%r retry_in_s=%.2f", str(exc), delay)
                self._stop.wait(delay)
                continue
            self.agent_id = view.id
            state.update(agent_id=view.id, name=cfg.name)
            self._save_state(state)
            log.info("event=registered agent_id=%s name=%s slots=%d", view.id, cfg.name, cfg.slots)
            return True
        return False

    # ------------------------------------------------------------ slot logic

    def _free(self) -> int:
        return self.config.slots - self._busy - self._reserved

    def _take_acks(self) -> list[int]:
        """All pending acks (caller holds the lock)."""
        ids = [aid for aid in self._acks if aid in self._attempts]
        self._acks.clear()
        return ids

    def _restore_acks(self, ids: list[int]) -> None:
        now = time.monotonic()
        for aid in ids:
            if aid in self._attempts and self._attempts[aid].completion is None:
                self._acks.setdefault(aid, now)

    def _claim(
        self, n: int, wait_s: float, done: list[_Attempt], res: _Reservation | None = None
    ) -> list[Offer]:
        """One claim request for ``n`` reserved slots, carrying ``done`` and pending acks.

        Uploads the outputs of ``done`` the master may lack first. On success
        the reservation turns into busy slots and the offers are queued for
        the slot threads; on failure the reservation is released, ``done``
        goes back to the outbox and the exception propagates. ``res``: the
        reservation this request fills (default: its own, of ``n`` slots),
        possibly shared with a talkback wake's claim (see :class:`_Reservation`).
        """
        assert self.agent_id is not None
        if res is None:
            res = _Reservation(n)
        with self._lock:
            acks = self._take_acks()
        try:
            for att in done:
                if not att.uploaded:
                    try:
                        self._upload(att)
                    except Exception as exc:
                        if not _is_client_error(exc):
                            raise
                        log.error("event=upload_failed attempt=%d error=%r", att.id, str(exc))
                        self._drop_outputs(att, f"cannot upload outputs: {exc}")
            comps = [a.completion for a in done if a.completion is not None]
            req = ClaimRequest(max_tasks=n, wait_s=wait_s, completions=comps, acks=acks)
            resp = self.client.claim(self.agent_id, req)
        except Exception as exc:
            with self._cond:
                self._unreserve(res)
                self._restore_acks(acks)
                if done:
                    self._outbox[:0] = done
                    self._outbox_since = self._outbox_since or time.monotonic()
                self._cond.notify_all()
            if _is_outcome_unknown(exc):
                log.warning("event=claim_outcome_unknown error=%r", str(exc))
            raise
        self.stats["claims"] += 1
        self.stats["acks_sent"] += len(acks)
        if resp.lease_s > 0:
            self.lease_s = resp.lease_s
        self._settle(done, resp.completions)
        if getattr(resp, "drain", False):
            self._drain_ordered()
        offers = list(resp.offers)
        with self._cond:
            if self._stop.is_set():
                late, offers = offers, []
            else:
                # Never more than reserved (plus slots free right now): the
                # rest of a shared reservation's offers go back at once.
                room = res.n + max(self._free(), 0)
                late = offers[room:]
                offers = offers[:room]
                took = min(len(offers), res.n)
                res.n -= took
                self._reserved -= took
                self._busy += len(offers)
                for o in offers:
                    self._attempts[o.attempt_id] = _Attempt.of(o)
                self._ready.extend(offers)
                self._slot_cond.notify(len(offers))
            self._unreserve(res)
            stopping = self._stop.is_set()
            self._cond.notify_all()
        if late:
            if stopping:
                self._release_late(late)
            else:
                log.info("event=offers_released count=%d reason=no_free_slot", len(late))
                self._release_late(late, "no free slot on the agent (a wake claimed in parallel)")
        return offers

    def _unreserve(self, res: _Reservation) -> None:
        """A request of ``res`` finished; the last one returns what is left (lock held)."""
        res.claims -= 1
        if res.claims <= 0:
            self._reserved -= res.n
            res.n = 0

    def _settle(self, done: list[_Attempt], results: list[CompletionResult]) -> None:
        by_id = {r.attempt_id: r for r in results}
        for att in done:
            r = by_id.get(att.id)
            if r is not None and r.result == "stale":
                self.stats["stale"] += 1
                log.info("event=completion_stale attempt=%d", att.id)
            else:
                self.stats["completed"] += 1
                if log.isEnabledFor(logging.INFO):
                    log.info(
                        "event=completed attempt=%d outcome=%s exit=%s task_state=%s",
                        att.id,
                        att.completion.outcome if att.completion else None,
                        att.completion.exit_code if att.completion else None,
                        r.task_state if r else None,
                    )
            self._forget(att)

    def _forget(self, att: _Attempt) -> None:
        """Drop an attempt the master answered for (or that is discarded)."""
        with self._lock:
            self._attempts.pop(att.id, None)
            self._acks.pop(att.id, None)
        if att.journaled:
            try:
                self.journal.remove(att.id)
            except OSError as exc:
                log.warning("event=journal_remove_failed attempt=%d error=%r", att.id, str(exc))
        if att.execution is not None:
            att.execution.cleanup(background=True)
        elif att.sandbox is not None:
            self.executor.cleaner.put(att.sandbox)

    def _release_late(self, offers: list[Offer], error: str = "agent shutting down") -> None:
        """Offers that arrived after stop (or beyond the free slots): hand them straight back
        (through the outbox)."""
        atts = []
        for o in offers:
            att = _Attempt.of(o)
            att.completion = Completion(
                attempt_id=o.attempt_id,
                token=o.token,
                outcome="released",
                error=error,
            )
            atts.append(att)
        with self._cond:
            for att in atts:
                self._attempts[att.id] = att
            self._outbox.extend(atts)
            self._outbox_since = self._outbox_since or time.monotonic()
            self._send_cond.notify()

    # ------------------------------------------------- sender and poller

    def _send_loop(self) -> None:
        """Deliver completions, each request claiming the slots they freed (§10).

        Completions that finish while a request is in flight ride on the next
        one together (one request, one transaction for several tasks). While
        attempts that started less than ``batch_young_s`` ago still run, the
        first completion waits at most ``batch_wait_s`` for them to join it:
        short tasks then fall into step and share requests, which halves the
        master's work per task at two slots; long tasks are never waited for.
        """
        cfg = self.config
        backoff = Backoff(cfg.backoff_base_s, cfg.backoff_max_s)
        retry_at = 0.0
        while True:
            with self._cond:
                while True:
                    if self._halt.is_set():
                        return
                    now = time.monotonic()
                    if not self._outbox:
                        self._send_cond.wait(1.0)
                        continue
                    if now < retry_at:
                        self._send_cond.wait(retry_at - now)
                        continue
                    linger = self._outbox_since + cfg.batch_wait_s - now
                    if linger > 0 and not retry_at and not self._stop.is_set():
                        young = now - cfg.batch_young_s
                        if any(t > young for t in self._started.values()):
                            self._send_cond.wait(linger)
                            continue
                    break
                done, self._outbox = self._outbox, []
                self._outbox_since = 0.0
                n = 0 if self._stop.is_set() else max(self._free(), 0)
                self._reserved += n
                self._sending = True
            try:
                self._claim(n, 0.0, done)
            except Exception as exc:
                if _is_client_error(exc):
                    # The master refuses these completions outright: drop them.
                    log.error(
                        "event=completion_rejected error=%r attempts=%s",
                        str(exc),
                        [a.id for a in done],
                    )
                    with self._cond:
                        self._outbox = [a for a in self._outbox if a not in done]
                    for a in done:
                        self._forget(a)
                    continue
                for a in done:  # keep them safe until a master answers
                    self._journal(a)
                delay = backoff.next(_retry_after(exc))
                retry_at = time.monotonic() + delay
                log.warning(
                    "event=delivery_failed attempts=%s error=%r retry_in_s=%.2f",
                    [a.id for a in done],
                    str(exc),
                    delay,
                )
            else:
                backoff.reset()
                retry_at = 0.0
            finally:
                with self._cond:
                    self._sending = False
                    self._cond.notify_all()

    def _poll_loop(self) -> None:
        """Claim for idle slots when nothing else asks: long-polls while the farm is idle."""
        cfg = self.config
        backoff = Backoff(cfg.backoff_base_s, cfg.backoff_max_s)
        while not self._halt.is_set():
            with self._cond:
                while not self._halt.is_set() and (
                    self._stop.is_set() or self._free() <= 0 or self._outbox or self._sending
                ):
                    self._cond.wait(1.0)
                if self._halt.is_set():
                    return
                n = self._free()
                self._reserved += n
                res = self._parked = _Reservation(n)  # a talkback wake may join it
                self._woken = False
            try:
                self._claim(n, cfg.poll_wait_s, [], res)
            except Exception as exc:
                delay = backoff.next(_retry_after(exc))
                log.warning("event=claim_failed error=%r retry_in_s=%.2f", str(exc), delay)
                self._backoff_wait(delay)
                continue
            finally:
                with self._lock:
                    if self._parked is res:
                        self._parked = None
            backoff.reset()

    def _backoff_wait(self, delay: float) -> None:
        """Wait ``delay`` seconds, or less if halted or a talkback wake arrives."""
        end = time.monotonic() + delay
        with self._cond:
            while not self._halt.is_set() and not self._woken:
                left = end - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            self._woken = False

    # -------------------------------------------------------------- talkback

    def wake(self) -> str:
        """Talkback ``wake``: work arrived, claim now. Latency only; never over-claims.

        - The poller is parked in a long-poll (on a master that may not know
          of the work yet): an immediate claim joins the parked poll's
          reservation, plus any slot nobody reserved (:class:`_Reservation`).
          The parked poll stays: a blocking request cannot be aborted from
          another thread without the client taking it for a master failure.
          Whichever answer comes first fills the slots; the other's offers
          beyond the free slots go back at once (``released``: requeued
          straight away, no retry budget used). Nothing is lost or doubled.
        - The poller is backing off after a failed claim: cut the wait short.
        - No free slot, stopping, completions being delivered (that request
          claims the freed slots anyway), or a wake claim already in flight:
          nothing to do.
        """
        with self._cond:
            if self._stop.is_set() or self.agent_id is None:
                return "stopping"
            if self._outbox or self._sending:
                return "delivering"
            res = self._parked
            extra = max(self._free(), 0)
            if res is None or res.claims <= 0:
                if extra <= 0:
                    return "busy"
                self._woken = True  # the poller is between claims or backing off
                self._cond.notify_all()
                return "poller"
            if res.claims > 1:
                return "claiming"
            if res.n + extra <= 0:
                return "busy"
            res.claims += 1
            res.n += extra
            self._reserved += extra
            n = res.n
        self.stats["wakes"] = self.stats.get("wakes", 0) + 1
        threading.Thread(
            target=self._wake_claim, args=(n, res), name="herder-wake", daemon=True
        ).start()
        return "claiming"

    def _wake_claim(self, n: int, res: _Reservation) -> None:
        try:
            offers = self._claim(n, 0.0, [], res)
            log.debug("event=wake_claim offers=%d", len(offers))
        except Exception as exc:  # latency only: the parked poll still claims
            log.debug("event=wake_claim_failed error=%r", str(exc))

    def talkback_status(self) -> dict[str, Any]:
        """``GET /talkback/status``."""
        with self._lock:
            running = sorted(
                a.id for a in self._attempts.values() if a.completion is None and not a.stale
            )
            return {
                "agent_id": self.agent_id,
                "name": self.config.name,
                "mode": getattr(self, "mode", "master"),
                "slots": self.config.slots,
                "busy": self._busy,
                "reserved": self._reserved,
                "free": max(self.config.slots - self._busy, 0),
                "running": running,
                "stopping": self._stop.is_set(),
                "parked": self._parked is not None,
            }

    def _start_talkback(self) -> None:
        """Serve the talkback endpoint (before registering: the master learns its URL)."""
        cfg = self.config
        if not cfg.talkback or self.talkback is not None:
            return
        from herder.agent.talkback import TalkbackServer

        try:
            tb = TalkbackServer(self, cfg.talkback, cfg.talkback_token)
            tb.start()
        except (OSError, ValueError) as exc:
            # Latency only: the agent works without it (masters cannot wake it).
            log.error("event=talkback_unavailable bind=%s error=%r", cfg.talkback, str(exc))
            return
        self.talkback = tb

    def _stop_talkback(self) -> None:
        tb, self.talkback = self.talkback, None
        if tb is not None:
            with contextlib.suppress(Exception):
                tb.stop()

    # ----------------------------------------------------------------- slots

    def _slot_loop(self) -> None:
        """One of ``slots`` threads: run offers from the ready queue, one at a time."""
        while True:
            with self._cond:
                while not self._ready and not self._halt.is_set():
                    self._slot_cond.wait()
                if not self._ready:
                    return
                offer = self._ready.popleft()
                self._started[offer.attempt_id] = time.monotonic()
            self._run_one(offer)

    def _run_one(self, offer: Offer) -> None:
        with self._lock:
            att = self._attempts.get(offer.attempt_id)
            if att is None:
                att = self._attempts[offer.attempt_id] = _Attempt.of(offer)
        if offer.inline:
            self._cache_inline(offer)
        ex = self.executor.execution(ExecSpec.from_offer(offer))
        att.execution = ex
        try:
            res = self._execute(att, ex)
            completion = self._make_completion(att, ex, res)
        except Exception as exc:  # a bug here must not leak the slot
            log.exception("event=runner_error attempt=%d", att.id)
            ex.cancel("launch_failed", f"agent error: {exc}")
            res = ExecResult("launch_failed")
            completion = Completion(
                attempt_id=att.id,
                token=att.token,
                outcome="launch_failed",
                error=_clip(f"agent error: {exc!r}"),
            )
        att.completion = completion
        if not att.stale and (res.duration_s >= self.config.journal_min_s or self._stop.is_set()):
            self._journal(att)  # worth keeping across a crash before the master answers
        with self._cond:
            self._busy -= 1
            self._started.pop(att.id, None)
            self._acks.pop(att.id, None)  # the completion implies the ack
            discard = att.stale
            if not discard:
                if not self._outbox:
                    self._outbox_since = time.monotonic()
                self._outbox.append(att)
                self._send_cond.notify()
            if discard or self._stop.is_set():
                self._cond.notify_all()
        if discard:
            log.info("event=attempt_discarded attempt=%d", att.id)
            self._forget(att)

    def _execute(self, att: _Attempt, ex: Execution) -> ExecResult:
        if att.stale or self._stop.is_set():
            ex.cancel("released" if not att.stale else "cancelled", "agent shutting down")
        try:
            ex.prepare()
        except StagingError as exc:
            log.warning("event=staging_failed attempt=%d error=%r", att.id, str(exc))
            return ExecResult("launch_failed", error=str(exc))
        early = ex.start()
        if early is not None:
            return early
        with self._lock:
            self._acks[att.id] = time.monotonic() + self.config.ack_delay_s
        return ex.wait()

    def _cache_inline(self, offer: Offer) -> None:
        """Small required files came with the offer: no blob request for them."""
        try:
            for digest, data in decode_inline(offer.inline).items():
                if not self.executor.blobs.add_verified(digest, data):
                    log.warning("event=inline_blob_mismatch attempt=%d", offer.attempt_id)
        except (ValueError, OSError) as exc:  # staging fetches what is not cached
            log.warning("event=inline_blob_failed attempt=%d error=%r", offer.attempt_id, str(exc))

    def _inline_outputs(self, att: _Attempt, res: ExecResult) -> dict[str, str]:
        """Outputs small enough to ride in the completion; empty: upload them instead."""
        sizes = [of.size for of, _path in res.outputs]
        if (
            not self.config.inline_outputs
            or max(sizes) > INLINE_OUTPUT_MAX
            or sum(sizes) > INLINE_TOTAL_MAX
        ):
            return {}
        blobs: dict[str, str] = {}
        try:
            for of, path in res.outputs:
                if of.digest not in blobs:
                    data = path.read_bytes()
                    if len(data) != of.size:  # changed since it was hashed: upload instead
                        return {}
                    blobs[of.digest] = encode_inline(data)
        except OSError as exc:
            log.warning("event=inline_outputs_failed attempt=%d error=%r", att.id, str(exc))
            return {}
        return blobs

    def _make_completion(self, att: _Attempt, ex: Execution, res: ExecResult) -> Completion:
        outputs = []
        inline: dict[str, str] = {}
        if res.outputs and not att.stale:
            outputs = res.output_files
            inline = self._inline_outputs(att, res)
            if inline:
                att.blobs, att.uploaded = {}, True
            elif (refused := self._upload_outputs(att, res)) is not None:
                return Completion(
                    attempt_id=att.id,
                    token=att.token,
                    outcome="launch_failed",
                    exit_code=res.exit_code,
                    error=_clip(f"cannot upload outputs: {refused}"),
                    log=self._final_log(att, ex),
                )
        return Completion(
            attempt_id=att.id,
            token=att.token,
            outcome=res.outcome,
            exit_code=res.exit_code,
            error=_clip(res.error) if res.error else None,
            outputs=outputs,
            log=self._final_log(att, ex),
            blobs=inline,
        )

    def _upload_outputs(self, att: _Attempt, res: ExecResult) -> str | None:
        """Upload outputs from the slot thread; the master's refusal, or None.

        A transient failure is not a refusal: the sender uploads before
        delivering (and retries).
        """
        att.blobs = {of.digest: path for of, path in res.outputs}
        att.uploaded = False
        try:
            self._upload(att)
        except Exception as exc:
            if _is_client_error(exc):
                log.error("event=upload_failed attempt=%d error=%r", att.id, str(exc))
                att.blobs, att.uploaded = {}, True
                return str(exc)
            log.warning("event=upload_deferred attempt=%d error=%r", att.id, str(exc))
        return None

    def _upload(self, att: _Attempt) -> None:
        """Upload the outputs of ``att`` the blob store lacks (one try; raises on failure)."""
        if att.blobs:
            missing = self.client.missing_blobs(list(att.blobs))
            for digest in missing:
                path = att.blobs[digest]
                try:
                    data = path.read_bytes()
                except OSError as exc:
                    if att.completion is None:
                        raise
                    # A journaled output is gone (sandbox removed by hand?): the
                    # result cannot stand; report an infrastructure failure instead.
                    log.error("event=output_lost attempt=%d path=%s", att.id, path)
                    self._drop_outputs(att, f"outputs lost before delivery: {exc}")
                    return
                self.client.put_blob(digest, data)
        att.uploaded = True

    def _drop_outputs(self, att: _Attempt, error: str) -> None:
        """Replace ``att``'s completion by an infrastructure failure without outputs."""
        assert att.completion is not None
        att.completion = Completion(
            attempt_id=att.id,
            token=att.token,
            outcome="launch_failed",
            exit_code=att.completion.exit_code,
            error=_clip(error),
            log=att.completion.log,
        )
        att.blobs, att.uploaded = {}, True

    def _final_log(self, att: _Attempt, ex: Execution) -> list[LogChunk]:
        """Everything not shipped yet; big remainders go out by append_log first."""
        with ex.log_lock:
            chunks = list(att.unsent)
            att.unsent = []
            while True:
                new, more = ex.read_logs(limit=LOG_BATCH, final=True)
                chunks.extend(new)
                if not more:
                    return _merge(chunks)
                if sum(len(c.data) for c in chunks) >= LOG_BATCH and not att.stale:
                    try:
                        self.client.append_log(att.id, att.token, _merge(chunks))
                        chunks = []
                    except Exception as exc:
                        if _is_stale(exc):
                            att.stale = True

    # ------------------------------------------------------------- heartbeat

    def _heartbeat_loop(self) -> None:
        """Heartbeat at once (it tells the master's lease length), then every lease / 3.

        The wait is re-checked every half second, so a shorter lease learnt
        from a claim (or a restarted master) takes effect at once.
        """
        cfg = self.config
        backoff = Backoff(cfg.backoff_base_s, cfg.backoff_max_s)
        last = -math.inf
        retry_in: float | None = None  # after a failure: the backoff delay
        while True:
            now = time.monotonic()
            due = last + (retry_in if retry_in is not None else self._hb_interval())
            if now < due and not self._hb_now.is_set():
                if self._halt.wait(min(due - now, 0.25)):
                    return
                continue
            if self._halt.is_set():
                return
            self._hb_now.clear()
            last = time.monotonic()
            try:
                self.heartbeat_once()
                backoff.reset()
                retry_in = None
            except Exception as exc:
                retry_in = min(backoff.next(_retry_after(exc)), self._hb_interval())
                log.warning("event=heartbeat_failed error=%r retry_in_s=%.2f", str(exc), retry_in)
            with contextlib.suppress(Exception):
                self.executor.reap_orphans()

    def _hb_interval(self) -> float:
        if self.config.heartbeat_interval_s:
            return self.config.heartbeat_interval_s
        return max(self.lease_s / 3.0, 0.2)

    def heartbeat_once(self) -> HeartbeatResponse:
        assert self.agent_id is not None
        with self._lock:
            running = [
                RunningAttempt(attempt_id=a.id, token=a.token)
                for a in self._attempts.values()
                if not a.stale
            ]
        hb = Heartbeat(running=running, usage=self.usage(), draining=self._stop.is_set())
        resp = self.client.heartbeat(self.agent_id, hb)
        if resp.lease_s > 0:
            self.lease_s = resp.lease_s
        for aid in resp.cancel:
            self.cancel_attempt(aid, "cancelled by the master")
        if getattr(resp, "drain", False):
            self._drain_ordered()
        return resp

    def _drain_ordered(self) -> None:
        """The master says drain: claim nothing more, finish what runs, deliver, exit 0."""
        if not self._stop.is_set():
            log.info("event=drain_requested running=%d", self._busy)
            self.request_stop(math.inf)

    def cancel_attempt(self, attempt_id: int, reason: str) -> None:
        """Kill an attempt the master no longer assigns to us; its result is discarded.

        An attempt whose process has already ended is left alone: its
        completion goes out anyway and the master refuses it (fencing), which
        costs one request and leaves the proof on the wire.
        """
        with self._lock:
            att = self._attempts.get(attempt_id)
            if att is None:
                return
            ex = att.execution
            if att.completion is not None or (ex is not None and ex.result is not None):
                log.info("event=attempt_cancel_after_exit attempt=%d", attempt_id)
                return
            att.stale = True
            self._acks.pop(attempt_id, None)
        log.info("event=attempt_cancel attempt=%d reason=%r", attempt_id, reason)
        if att.execution is not None:
            att.execution.cancel("cancelled", reason)

    def usage(self) -> ResourceUsage | None:
        try:
            import psutil

            vm = psutil.virtual_memory()
            io = psutil.disk_io_counters()
            assert self.config.work_root is not None
            disk = psutil.disk_usage(str(self.config.work_root))
            return ResourceUsage(
                ram_used_mb=round((vm.total - vm.available) / 1048576, 1),
                ram_total_mb=round(vm.total / 1048576, 1),
                cpu_percent=psutil.cpu_percent(interval=None),
                load_1m=max(os.getloadavg()[0], 0.0),
                disk_free_mb=round(disk.free / 1048576, 1),
                io_read_bytes=io.read_bytes if io else None,
                io_write_bytes=io.write_bytes if io else None,
            )
        except Exception as exc:  # usage is best effort
            log.debug("event=usage_failed error=%r", str(exc))
            return None

    # ----------------------------------------------------------- log shipper

    def _log_loop(self) -> None:
        while not self._halt.wait(self.config.log_interval_s):
            self.flush_acks()
            self.ship_logs()

    def flush_acks(self, force: bool = False) -> None:
        """Send the acks no claim has carried within ``ack_delay_s``."""
        now = time.monotonic()
        with self._lock:
            due = [aid for aid, t in self._acks.items() if force or t <= now]
            for aid in due:
                del self._acks[aid]
            atts = [self._attempts[aid] for aid in due if aid in self._attempts]
        for att in atts:
            try:
                self.client.ack(att.id, att.token)
                self.stats["acks_sent"] += 1
            except Exception as exc:
                if _is_stale(exc):
                    with self._lock:
                        done = att.completion is not None
                    if not done:
                        self.cancel_attempt(att.id, "stale attempt (ack refused)")
                else:
                    log.warning("event=ack_failed attempt=%d error=%r", att.id, str(exc))
                    with self._lock:
                        if att.completion is None and att.id in self._attempts:
                            self._acks[att.id] = now + self.config.ack_delay_s

    def ship_logs(self) -> None:
        with self._lock:
            atts = [
                a
                for a in self._attempts.values()
                if a.execution is not None and a.completion is None
            ]
        for att in atts:
            ex = att.execution
            assert ex is not None
            if not ex.running or att.stale:
                continue
            if not ex.log_lock.acquire(blocking=False):
                continue  # the runner is reading the final log
            try:
                if att.completion is not None:
                    continue
                new, _ = ex.read_logs(limit=LOG_BATCH)
                chunks = _merge(att.unsent + new)
                if not chunks:
                    continue
                try:
                    self.client.append_log(att.id, att.token, chunks)
                    att.unsent = []
                except Exception as exc:
                    if _is_stale(exc):
                        att.unsent = []
                        self.cancel_attempt(att.id, "stale attempt (log refused)")
                    elif _is_outcome_unknown(exc):
                        att.unsent = []  # may have arrived; resending could duplicate it
                    else:
                        att.unsent = chunks
            finally:
                ex.log_lock.release()

    # ----------------------------------------------------------- inspection

    @property
    def busy(self) -> int:
        return self._busy

    @property
    def reserved(self) -> int:
        return self._reserved

    def running_attempts(self) -> list[int]:
        with self._lock:
            return sorted(self._attempts)


def _merge(chunks: list[LogChunk]) -> list[LogChunk]:
    """Join consecutive chunks of the same stream."""
    out: list[LogChunk] = []
    for c in chunks:
        if out and out[-1].stream == c.stream:
            out[-1] = LogChunk(stream=c.stream, data=out[-1].data + c.data)
        elif c.data:
            out.append(c)
    return out


def _clip(text: str) -> str:
    return text if len(text) <= ERROR_MAX else text[: ERROR_MAX - 20] + " … (truncated)"


@contextlib.contextmanager
def _signals(handler: Callable[[], None]) -> Iterator[None]:
    """Install SIGTERM/SIGINT handlers (main thread only); restore them after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old: dict[signal.Signals, Any] = {}

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("event=signal signal=%s", signal.Signals(signum).name)
        handler()

    for sig in (signal.SIGTERM, signal.SIGINT):
        old[sig] = signal.signal(sig, on_signal)
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


@contextlib.contextmanager
def _usr1(handler: Callable[[], None]) -> Iterator[None]:
    """SIGUSR1 → leave autonomous mode (the agent's local API besides talkback ``mode``)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_usr1(_signum: int, _frame: FrameType | None) -> None:
        handler()

    old = signal.signal(signal.SIGUSR1, on_usr1)
    try:
        yield
    finally:
        signal.signal(signal.SIGUSR1, old)


def run_agent(config: AgentConfig, client: AgentClient | None = None) -> int:
    """Run an agent until SIGTERM/SIGINT or a drain order; drain; return the exit status (0)."""
    agent = Agent(config, client)
    try:
        with _signals(agent.on_signal), _usr1(agent.request_master_mode):
            return agent.run()
    finally:
        with contextlib.suppress(Exception):
            agent.client.close()


__all__ = [
    "Agent",
    "AgentClient",
    "AgentConfig",
    "Backoff",
    "Outcome",
    "default_state_dir",
    "run_agent",
]
