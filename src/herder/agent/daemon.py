"""The agent daemon: register, claim, run, report (DESIGN §4, §5, §10).

Threads, not asyncio. ``Agent`` is composed of one mixin per room, each in
its own module of ``herder.agent``:

==================  ==========================================================
``config``          ``AgentConfig``, ``default_state_dir``, ``Backoff``
``state``           ``AgentCore``: the lock, slot counts, attempt records;
                    the ``AgentClient`` protocol; helpers
``claims``          sender, poller, reservations, claim-ahead window, wake
``slots``           slot threads: run one attempt, completion, outputs, uploads
``heartbeat``       heartbeat, reconciliation, cancel, drain order, usage,
                    acks and log shipping
``delivery``        journal, journal replay, settle/forget, hand-back
``daemon``          ``Agent`` (lifecycle: run, drain, register, talkback
                    endpoint) and ``run_agent``
``executor``        sandboxes, staging, spawning, timeouts, output collection
``direct``          the direct-execution listener (``--direct-listen``, DESIGN §9)
==================  ==========================================================

One agent per state dir: ``Agent.run`` holds an exclusive lock on
``<state_dir>/lock`` (``herder.statelock``) for as long as it runs; a second
one raises ``StateDirBusy`` (``run_agent``: one ``error:`` line, exit 2).

Completions the master has not acknowledged can be kept in the journal
(``herder.agent.journal``): a restarted agent delivers them, still fenced,
before it claims anything. The executor's cleaner removes sandboxes once
their completion is acknowledged, off the critical path.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

from herder.agent import credentials
from herder.agent.claims import ClaimsMixin
from herder.agent.config import AgentConfig, Backoff, default_state_dir, retry_after
from herder.agent.delivery import DeliveryMixin
from herder.agent.executor import Executor
from herder.agent.heartbeat import HeartbeatMixin
from herder.agent.journal import Journal
from herder.agent.slots import SlotsMixin
from herder.agent.state import AgentClient
from herder.api_models import AgentRegister, Outcome
from herder.statelock import StateDirBusy, StateLock

log = logging.getLogger("herder.agent")


class Agent(ClaimsMixin, SlotsMixin, HeartbeatMixin, DeliveryMixin):
    """One agent: ``Agent(config, client=None, executor=None).run()`` until stopped.

    ``client``: any object implementing :class:`AgentClient` (default: a
    ``ModalClient`` over HTTP that falls back to autonomous mode). ``run()``
    may be called from any thread; signal handlers are installed only by
    :func:`run_agent` in the main thread.
    """

    def __init__(
        self,
        config: AgentConfig,
        client: AgentClient | None = None,
        executor: Executor | None = None,
    ) -> None:
        super().__init__(config)
        self._modal = None
        assert config.state_dir is not None
        token, self._token_source = credentials.initial_token(
            config.state_dir, config.token, config.join_token
        )
        if client is None:
            from herder.agent.autonomous import ModalClient

            client = self._modal = ModalClient(
                config.masters,
                dns_name=config.dns_name,
                resolver=config.resolver,
                srv=config.srv,
                timeout=config.request_timeout_s,
                token=token,
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
        self.client = client
        assert config.work_root is not None
        self.executor = executor or Executor(
            config.work_root,
            config.state_dir / "blobs",
            lambda digest, dest: self.client.download_blob(digest, dest),
            base_env=config.env,
            kill_grace_s=config.kill_grace_s,
            ram_tolerance=config.ram_tolerance,
        )
        # A progress change (herder.agent.watch) is reported by an early heartbeat.
        self.executor.watcher.on_progress = self._hb_now.set
        self.journal = Journal(config.state_dir / "journal")
        self.talkback = None  # TalkbackServer while running
        self.direct: Any = None  # DirectServer while running (config.direct)

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
        """Lock the state dir, register, deliver the journal, work until stopped, drain,
        deliver. Returns 0; :class:`StateDirBusy` if another agent holds the state dir."""
        # Before anything touches the state dir: a second agent would purge the
        # first's sandboxes and replay its journal.
        with StateLock(self.config.state_dir):
            return self._run_locked()

    def _run_locked(self) -> int:
        cfg = self.config
        journaled = self.journal.load()
        purged = self.executor.purge_stale(keep={e.attempt_id for e in journaled})
        if purged:
            log.info("event=purged_sandboxes count=%d", purged)
        self._start_talkback()
        self._start_direct()
        if not self.register():
            self._halt.set()
            self._stop_talkback()
            self._stop_direct()
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
        # Offers claimed ahead that no slot has taken go back at once.
        self._release_ready("agent shutting down")
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
        self.executor.drop_spares()
        if not self.executor.cleaner.flush(timeout=10.0):
            log.warning("event=cleanup_pending count=%d", self.executor.cleaner.pending)
        self._stop_talkback()
        self._stop_direct()
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
            gpus=cfg.gpus,
            max_ram_mb=cfg.max_ram_mb,
            max_load=cfg.max_load,
            version=__version__,
            talkback_url=self.talkback.url if self.talkback is not None else None,
            talkback_token=self.talkback.token if self.talkback is not None else None,
            accept_owners=list(cfg.accept_owners),
            accept_pools=list(cfg.accept_pools),
        )
        backoff = Backoff(cfg.backoff_base_s, cfg.backoff_max_s)
        while not self._stop.is_set():
            try:
                view = self.client.register_agent(req)
            except Exception as exc:
                if self._rejoin(exc):  # its saved token is no longer valid: join anew
                    state.pop("agent_id", None)
                    req = req.model_copy(update={"agent_id": None})
                    continue
                delay = backoff.next(retry_after(exc))
                log.warning("event=register_failed error=%r retry_in_s=%.2f", str(exc), delay)
                self._stop.wait(delay)
                continue
            self.agent_id = view.id
            own = getattr(view, "token", None)  # joined: the agent's own token, kept
            if own:
                credentials.save_agent_token(cfg.state_dir, own)
                credentials.use_token(self.client, own)
                self._token_source = "state"
                log.info("event=joined agent_id=%s token_file=%s", view.id, cfg.state_dir)
            state.update(agent_id=view.id, name=cfg.name)
            self._save_state(state)
            log.info("event=registered agent_id=%s name=%s slots=%d", view.id, cfg.name, cfg.slots)
            return True
        return False

    def _rejoin(self, exc: BaseException) -> bool:
        """A saved token refused (401: revoked, expired) with a join token at hand:
        forget the token and the id it acted as, and register anew with the join token."""
        join = self.config.join_token
        if getattr(exc, "status", None) != 401 or self._token_source != "state" or not join:
            return False
        log.warning("event=agent_token_refused rejoining error=%r", str(exc))
        credentials.forget_agent_token(self.config.state_dir)
        credentials.use_token(self.client, join)
        self._token_source = "join"
        return True

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
                "ready": len(self._ready),  # claimed ahead, waiting for a slot
                "window": self._window(),
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
            tb = TalkbackServer(
                self, cfg.talkback, cfg.talkback_token, ssl_context=cfg.server_tls()
            )
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

    def _start_direct(self) -> None:
        """Serve direct execution beside farm work (same executor and blob cache)."""
        if self.config.direct is None:
            return
        from herder.agent.direct import DirectServer

        try:
            server = DirectServer(self.executor, self.config.direct)
            server.start()
        except (OSError, ValueError) as exc:
            log.error(
                "event=direct_unavailable bind=%s error=%r", self.config.direct.bind, str(exc)
            )
            return
        self.direct = server

    def _stop_direct(self) -> None:
        server, self.direct = self.direct, None
        if server is not None:
            with contextlib.suppress(Exception):
                server.stop()

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
    """Run an agent until SIGTERM/SIGINT or a drain order; drain; return the exit status.

    0; 2 (after one line on stderr) when another process holds the state dir.
    An agent with a direct listener and no master to find serves only direct
    work (:func:`herder.agent.direct.run_direct_only`): it never registers.
    """
    if config.direct is not None and client is None and not config.masters and not config.dns_name:
        from herder.agent.direct import run_direct_only

        assert config.work_root is not None
        return run_direct_only(
            config.state_dir, config.work_root, config.direct, config.kill_grace_s
        )
    agent = Agent(config, client)
    try:
        with _signals(agent.on_signal), _usr1(agent.request_master_mode):
            return agent.run()
    except StateDirBusy as exc:
        log.error("event=state_dir_busy state_dir=%s pid=%s", exc.directory, exc.pid)
        print(f"error: {exc}", file=sys.stderr, flush=True)  # the CLI's error format
        return 2
    finally:
        with contextlib.suppress(Exception):
            agent.client.close()


__all__ = [
    "Agent",
    "AgentClient",
    "AgentConfig",
    "Backoff",
    "Outcome",
    "StateDirBusy",
    "default_state_dir",
    "run_agent",
]
