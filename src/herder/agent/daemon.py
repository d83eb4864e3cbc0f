"""The agent daemon: register, claim, run, report (DESIGN §4, §5, §10).

Threads, not asyncio:

- the **dispatcher** claims as many tasks as there are free slots in one
  request (long-polling when it has nothing else to do) and starts one runner
  per offer; it also re-delivers completions that could not be delivered;
- a **runner** stages and runs one attempt, uploads the outputs the blob store
  lacks, then delivers its completion *together with a claim for the slot it
  frees* (one round trip per task) and runs what comes back;
- the **heartbeat** thread renews leases, reports resource usage and kills
  the attempts the master says to cancel;
- the **log shipper** sends new stdout/stderr of running attempts every
  ``log_interval_s`` and sends the acks that no claim carried in time.

Acks are piggy-backed: a started attempt's ack waits ``ack_delay_s`` for the
next claim request (any runner's or the dispatcher's); a completion implies
it. Only attempts that run longer than that cost one extra ``ack`` request,
so a short task costs exactly one round trip.

Slots are counted under one lock: ``busy`` (attempts whose process is being
prepared or runs) plus ``reserved`` (slots asked for by claims in flight)
never exceed ``slots``, so the dispatcher and runners never over-claim.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, Protocol

from herder.agent.executor import ExecResult, ExecSpec, Execution, Executor, StagingError
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
    Offer,
    Outcome,
    ResourceUsage,
    RunningAttempt,
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
    token: str | None = None
    verify: bool | str = True
    cpus: int = field(default_factory=lambda: os.cpu_count() or 1)
    ram_mb: int = field(default_factory=_ram_mb)
    env: dict[str, str] | None = None  # base environment of tasks (default: the agent's)

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
    offer: Offer
    execution: Execution | None = None
    stale: bool = False  # the master no longer wants it: kill, never report
    unsent: list[LogChunk] = field(default_factory=list)  # log a failed append_log kept
    completion: Completion | None = None

    @property
    def id(self) -> int:
        return self.offer.attempt_id

    @property
    def token(self) -> str:
        return self.offer.token


class Agent:
    def __init__(
        self,
        config: AgentConfig,
        client: AgentClient | None = None,
        executor: Executor | None = None,
    ) -> None:
        self.config = config
        if client is None:
            from herder.client import HerderClient

            client = HerderClient(
                config.masters,
                timeout=config.request_timeout_s,
                token=config.token,
                verify=config.verify,
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
        self.agent_id: str | None = None
        self.lease_s = 30.0
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._busy = 0
        self._reserved = 0
        self._attempts: dict[int, _Attempt] = {}
        self._acks: dict[int, float] = {}  # attempt id -> when it must be sent
        self._undelivered: list[_Attempt] = []
        self._stop = threading.Event()  # stop claiming (drain)
        self._halt = threading.Event()  # stop everything
        self._threads: list[threading.Thread] = []
        self._runners: set[threading.Thread] = set()
        self.stats = {"claims": 0, "completed": 0, "stale": 0, "acks_sent": 0}

    # ------------------------------------------------------------- lifecycle

    def request_stop(self) -> None:
        """Stop claiming new work and drain (safe from a signal handler)."""
        self._stop.set()
        # Never block in a signal handler: notify the condition from a thread.
        threading.Thread(target=self._notify, daemon=True).start()

    def _notify(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def run(self) -> int:
        """Register, work until :meth:`request_stop`, drain, deliver. Returns 0."""
        cfg = self.config
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        purged = self.executor.purge_stale()
        if purged:
            log.info("event=purged_sandboxes count=%d", purged)
        if not self.register():
            return 0
        self._start_thread("herder-dispatch", self._dispatch_loop)
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
        log.info("event=draining running=%d timeout_s=%g", self._busy, cfg.drain_timeout_s)
        deadline = time.monotonic() + cfg.drain_timeout_s
        with self._cond:
            self._cond.notify_all()
            while self._busy > 0 and time.monotonic() < deadline:
                self._cond.wait(min(0.2, max(deadline - time.monotonic(), 0.01)))
            still = self._busy
        if still:
            log.warning("event=drain_timeout killing=%d", still)
            self.executor.kill_all("released", "agent shutting down (drain timeout)")
        # Runners now report (claims with max_tasks=0); wait for their deliveries.
        # Completions whose delivery failed are retried here (with backoff) in
        # case the dispatcher is stuck in a long-poll.
        deadline = time.monotonic() + cfg.delivery_timeout_s + cfg.kill_grace_s
        backoff = Backoff(cfg.backoff_base_s, cfg.backoff_max_s)
        next_try = 0.0
        while time.monotonic() < deadline:
            with self._lock:
                runners = [t for t in self._runners if t.is_alive()]
                left = len(self._attempts)
            if not runners and not left:
                break
            now = time.monotonic()
            if not runners and now >= next_try:
                if self._deliver_undelivered_once():
                    backoff.reset()
                else:
                    next_try = now + backoff.next()
            time.sleep(0.05)
        with self._lock:
            lost = [a.id for a in self._attempts.values()]
        if lost:
            log.error("event=undelivered attempts=%s", lost)
        self._halt.set()
        self._notify()
        for t in self._threads:
            if t.name != "herder-dispatch":
                t.join(timeout=2)
        # The dispatcher may sit in a long-poll; it releases whatever arrives late.
        self._threads[0].join(timeout=1.0)
        log.info("event=stopped stats=%s", json.dumps(self.stats))

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

    def _claim(self, n: int, wait_s: float, done: list[_Attempt]) -> list[Offer] | None:
        """One claim request for ``n`` reserved slots, carrying ``done`` and pending acks.

        On success the reservation turns into busy slots for the offers; on
        failure it is released and ``done`` goes back to the undelivered list.
        Returns the offers to run, or None on failure.
        """
        assert self.agent_id is not None
        with self._lock:
            acks = self._take_acks()
        comps = [a.completion for a in done if a.completion is not None]
        req = ClaimRequest(max_tasks=n, wait_s=wait_s, completions=comps, acks=acks)
        try:
            resp = self.client.claim(self.agent_id, req)
        except Exception as exc:
            with self._cond:
                self._reserved -= n
                self._restore_acks(acks)
                self._undelivered.extend(done)
                self._cond.notify_all()
            if _is_outcome_unknown(exc):
                log.warning("event=claim_outcome_unknown error=%r", str(exc))
            raise
        self.stats["claims"] += 1
        self.stats["acks_sent"] += len(acks)
        if resp.lease_s > 0:
            self.lease_s = resp.lease_s
        self._settle(done, resp.completions)
        offers = list(resp.offers)
        with self._cond:
            self._reserved -= n
            if self._stop.is_set():
                late, offers = offers, []
            else:
                late = offers[n:]  # never more than asked for (defensive)
                offers = offers[:n]
                self._busy += len(offers)
                for o in offers:
                    self._attempts[o.attempt_id] = _Attempt(o)
            self._cond.notify_all()
        if late:
            self._release_late(late)
        return offers

    def _settle(self, done: list[_Attempt], results: list[CompletionResult]) -> None:
        by_id = {r.attempt_id: r for r in results}
        for att in done:
            r = by_id.get(att.id)
            if r is not None and r.result == "stale":
                self.stats["stale"] += 1
                log.info("event=completion_stale attempt=%d", att.id)
            else:
                self.stats["completed"] += 1
                log.info(
                    "event=completed attempt=%d outcome=%s exit=%s task_state=%s",
                    att.id,
                    att.completion.outcome if att.completion else None,
                    att.completion.exit_code if att.completion else None,
                    r.task_state if r else None,
                )
            self._forget(att)

    def _forget(self, att: _Attempt) -> None:
        with self._cond:
            self._attempts.pop(att.id, None)
            self._acks.pop(att.id, None)
            self._cond.notify_all()
        if att.execution is not None:
            try:
                att.execution.cleanup()
            except OSError as exc:
                log.warning("event=cleanup_failed attempt=%d error=%r", att.id, str(exc))

    def _release_late(self, offers: list[Offer]) -> None:
        """Offers that arrived after stop: hand them straight back."""
        atts = []
        for o in offers:
            att = _Attempt(o)
            att.completion = Completion(
                attempt_id=o.attempt_id,
                token=o.token,
                outcome="released",
                error="agent shutting down",
            )
            atts.append(att)
        with self._lock:
            for att in atts:
                self._attempts[att.id] = att
        try:
            self._deliver(atts)
        except Exception as exc:
            log.warning("event=release_failed error=%r", str(exc))

    def _deliver(self, done: list[_Attempt]) -> None:
        """Deliver completions with a claim for zero tasks."""
        self._claim(0, 0.0, done)

    def _deliver_undelivered_once(self) -> bool:
        """Try once to deliver what is waiting; False when that failed."""
        with self._lock:
            done, self._undelivered = self._undelivered, []
        if not done:
            return True
        try:
            self._deliver(done)
        except Exception as exc:
            log.warning("event=delivery_failed error=%r", str(exc))
            return False
        return True

    # ------------------------------------------------------------ dispatcher

    def _dispatch_loop(self) -> None:
        cfg = self.config
        backoff = Backoff(cfg.backoff_base_s, cfg.backoff_max_s)
        while not self._halt.is_set():
            with self._cond:
                while (
                    not self._halt.is_set()
                    and not self._undelivered
                    and (self._stop.is_set() or self._free() <= 0)
                ):
                    self._cond.wait(1.0)
                if self._halt.is_set():
                    return
                done, self._undelivered = self._undelivered, []
                n = 0 if self._stop.is_set() else self._free()
                self._reserved += n
            wait_s = cfg.poll_wait_s if (n > 0 and not done) else 0.0
            try:
                offers = self._claim(n, wait_s, done)
            except Exception as exc:
                if _is_client_error(exc) and done:
                    # The master refuses these completions outright: drop them.
                    log.error(
                        "event=completion_rejected error=%r attempts=%s",
                        str(exc),
                        [a.id for a in done],
                    )
                    with self._lock:
                        self._undelivered = [a for a in self._undelivered if a not in done]
                    for a in done:
                        self._forget(a)
                    continue
                delay = backoff.next(_retry_after(exc))
                log.warning("event=claim_failed error=%r retry_in_s=%.2f", str(exc), delay)
                self._halt.wait(delay)
                continue
            backoff.reset()
            for o in offers or []:
                self._spawn_runner(o)

    def _spawn_runner(self, offer: Offer) -> None:
        t = threading.Thread(
            target=self._guard(lambda: self._runner(offer)),
            name=f"herder-run-{offer.attempt_id}",
            daemon=True,
        )
        with self._lock:
            self._runners = {r for r in self._runners if r.is_alive()}
            self._runners.add(t)
        t.start()

    # ---------------------------------------------------------------- runner

    def _runner(self, offer: Offer | None) -> None:
        while offer is not None:
            offers = self._run_one(offer)
            offer = offers[0] if offers else None
            for o in offers[1:]:
                self._spawn_runner(o)

    def _run_one(self, offer: Offer) -> list[Offer]:
        with self._lock:
            att = self._attempts.get(offer.attempt_id) or _Attempt(offer)
            self._attempts[att.id] = att
        ex = self.executor.execution(ExecSpec.from_offer(offer))
        att.execution = ex
        log.debug("event=attempt_start attempt=%d task=%d", att.id, offer.task_id)
        try:
            res = self._execute(att, ex)
            completion = self._make_completion(att, ex, res)
        except Exception as exc:  # a bug here must not leak the slot
            log.exception("event=runner_error attempt=%d", att.id)
            ex.cancel("launch_failed", f"agent error: {exc}")
            completion = Completion(
                attempt_id=att.id,
                token=att.token,
                outcome="launch_failed",
                error=_clip(f"agent error: {exc!r}"),
            )
        with self._cond:
            self._busy -= 1
            self._acks.pop(att.id, None)  # the completion implies the ack
            att.completion = completion
            if att.stale:
                n = -1
            else:
                n = 0 if self._stop.is_set() else max(self._free(), 0)
                self._reserved += n
            self._cond.notify_all()
        if n < 0:
            log.info("event=attempt_discarded attempt=%d", att.id)
            self._forget(att)
            return []
        try:
            return self._claim(n, 0.0, [att]) or []
        except Exception as exc:
            log.warning("event=complete_failed attempt=%d error=%r", att.id, str(exc))
            return []

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

    def _make_completion(self, att: _Attempt, ex: Execution, res: ExecResult) -> Completion:
        error = res.error
        outputs = []
        if res.outputs and not att.stale:
            try:
                self._upload(att, res)
                outputs = res.output_files
            except Exception as exc:
                log.error("event=upload_failed attempt=%d error=%r", att.id, str(exc))
                return Completion(
                    attempt_id=att.id,
                    token=att.token,
                    outcome="launch_failed",
                    exit_code=res.exit_code,
                    error=_clip(f"cannot upload outputs: {exc}"),
                    log=self._final_log(att, ex),
                )
        return Completion(
            attempt_id=att.id,
            token=att.token,
            outcome=res.outcome,
            exit_code=res.exit_code,
            error=_clip(error) if error else None,
            outputs=outputs,
            log=self._final_log(att, ex),
        )

    def _upload(self, att: _Attempt, res: ExecResult) -> None:
        """Upload the outputs the blob store lacks; retry transient failures until halted."""
        where = {of.digest: path for of, path in res.outputs}
        backoff = Backoff(self.config.backoff_base_s, self.config.backoff_max_s)
        while True:
            try:
                for digest in self.client.missing_blobs(list(where)):
                    self.client.put_blob(digest, where[digest].read_bytes())
                return
            except Exception as exc:
                if _is_client_error(exc) or self._halt.is_set() or att.stale:
                    raise
                delay = backoff.next(_retry_after(exc))
                log.warning(
                    "event=upload_retry attempt=%d error=%r retry_in_s=%.2f",
                    att.id,
                    str(exc),
                    delay,
                )
                self._halt.wait(delay)

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
        cfg = self.config
        backoff = Backoff(cfg.backoff_base_s, cfg.backoff_max_s)
        delay = self._hb_interval()
        while not self._halt.wait(delay):
            try:
                self.heartbeat_once()
                backoff.reset()
                delay = self._hb_interval()
            except Exception as exc:
                delay = min(backoff.next(_retry_after(exc)), self._hb_interval())
                log.warning("event=heartbeat_failed error=%r retry_in_s=%.2f", str(exc), delay)
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
        return resp

    def cancel_attempt(self, attempt_id: int, reason: str) -> None:
        """Kill an attempt the master no longer assigns to us; its result is discarded."""
        with self._lock:
            att = self._attempts.get(attempt_id)
            if att is None:
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


def run_agent(config: AgentConfig, client: AgentClient | None = None) -> int:
    """Run an agent until SIGTERM/SIGINT; drain; return the exit status (0)."""
    agent = Agent(config, client)
    try:
        with _signals(agent.request_stop):
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
