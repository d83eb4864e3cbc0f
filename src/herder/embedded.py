"""The embedded farm of ``herder run``: master service and agent inside this process.

DESIGN §1: "the embedded farm may run the master's service and the agent's
executor inside the ``herder run`` process itself, talking through an
in-process transport instead of HTTP, as long as it runs the same store
transactions and the same executor code as a networked farm". So this is a
:class:`herder.store.Store` on SQLite in the state directory (``.herder/``
of the working directory, kept after the run for ``herder status`` and
``herder logs``), a :class:`herder.master.service.MasterService` over it with
the master's maintenance, and an unmodified :class:`herder.agent.daemon.Agent`
whose client is :class:`herder.inprocess.InProcessClient`. No second
implementation of anything: only the transport differs.

One ``herder run`` at a time owns a state directory (an exclusive lock on
``.herder/lock``); jobs an earlier run left unfinished (it was killed) are
cancelled at start (waiting ones too), since nobody follows them any more.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from herder.core.states import JOB_TERMINAL, JobState
from herder.errors import DatabaseError
from herder.inprocess import InProcessClient
from herder.statelock import StateDirBusy, StateLock

if TYPE_CHECKING:
    from herder.store.stops import CancelledAttempt

__all__ = ["EmbeddedFarm", "StateDirBusy", "inspect_state"]

log = logging.getLogger("herder.embedded")

MAINTENANCE_INTERVAL_S = 1.0
HOLDER = "embedded"


def _file_logging(logs: Path, level: str) -> logging.Handler:
    """The farm's own log lines go to ``logs/farm.log`` (JSON lines), never to the terminal."""
    from herder.logsetup import JsonFormatter

    logs.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(logs / "farm.log", mode="w", encoding="utf-8", delay=True)
    handler.setFormatter(JsonFormatter())
    handler.setLevel(level.upper())
    root = logging.getLogger()
    root.addHandler(handler)
    if root.level == logging.NOTSET or root.level > handler.level:
        root.setLevel(handler.level)
    return handler


class EmbeddedFarm:
    """A store, a master service and one agent with ``slots`` slots, in this process."""

    def __init__(
        self,
        state_dir: Path,
        slots: int,
        *,
        lease_s: float = 30.0,
        ack_timeout_s: float = 30.0,
        log_level: str = "warning",
        agent_options: dict[str, Any] | None = None,
        abandon_unfinished: bool = True,
    ) -> None:
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._lock = StateLock(self.state_dir)
        self._log_handler: logging.Handler | None = None
        self._threads: list[threading.Thread] = []
        self._halt = threading.Event()
        try:
            self._log_handler = _file_logging(self.state_dir / "logs", log_level)
            from herder.master.service import MasterService
            from herder.store import Store

            self.store = Store.open(
                f"sqlite:///{self.state_dir / 'herder.db'}",
                migrate=True,
                lease_s=lease_s,
                ack_timeout_s=ack_timeout_s,
            )
            # A job that fails or is cancelled kills its running attempts at once:
            # the in-process agent is told directly (a networked master uses talkback).
            self.service = MasterService(self.store, on_cancel=self._cancel_in_agent)
            if abandon_unfinished:
                self._abandon_unfinished()
            # Recovery on start, as a master's (seeds/002).
            self.store.reap()
            self._client = InProcessClient(self.service)
            self._start_agent(slots, agent_options or {})
            self._start_thread("herder-maintenance", self._maintenance_loop)
        except BaseException:
            self._release()
            raise

    @property
    def url(self) -> str:
        return f"embedded:{self.state_dir}"

    def client(self) -> InProcessClient:
        return self._client

    # -------------------------------------------------------------- internals

    def _cancel_in_agent(self, cancelled: Sequence[CancelledAttempt]) -> None:
        """The store cancelled attempts (after its commit): kill those of our agent now."""
        agent = getattr(self, "agent", None)
        if agent is None or agent.agent_id is None:
            return  # not started yet: nothing of ours runs
        for c in cancelled:
            if c.agent_id == agent.agent_id:
                agent.cancel_attempt(c.attempt_id, c.reason)

    def _abandon_unfinished(self) -> None:
        # Every state that is not final, waiting (depends_on) included: a held job
        # left behind would otherwise wait forever for a parent nobody retries.
        # Ids first, then cancels: cancelling a parent fails its waiting children,
        # and cancel_job leaves an already finished job as it is.
        unfinished = sorted(
            job.id
            for state in JobState
            if state not in JOB_TERMINAL
            for job in self.store.list_jobs(state=state.value, limit=10_000)
        )
        for job_id in unfinished:
            self.store.cancel_job(job_id, "abandoned: the herder run that submitted it is gone")

    def _start_agent(self, slots: int, options: dict[str, Any]) -> None:
        from herder.agent.daemon import Agent, AgentConfig

        cfg = AgentConfig(
            masters=[],
            slots=slots,
            name="local",
            state_dir=self.state_dir / "agent",
            talkback=None,
            **options,
        )
        self.agent = Agent(cfg, client=self._client)
        self._start_thread("herder-agent", self.agent.run)

    def _start_thread(self, name: str, target: Any) -> None:
        def run() -> None:
            try:
                target()
            except Exception:
                log.exception("event=embedded_thread_crashed thread=%s", name)

        t = threading.Thread(target=run, name=name, daemon=True)
        self._threads.append(t)
        t.start()

    def _maintenance_loop(self) -> None:
        while not self._halt.wait(MAINTENANCE_INTERVAL_S):
            try:
                self.service.maintain(HOLDER, 10.0)
            except DatabaseError as exc:
                # A full or locked database: one line a round, no traceback (the run's
                # own requests report it to the user).
                log.warning("event=reap_failed error=%r", str(exc))
            except Exception:
                log.exception("event=reap_failed")

    # -------------------------------------------------------------- lifecycle

    def close(self, *, at_once: bool = True) -> None:
        """Stop the agent (``at_once``: kill and hand back what still runs), then the rest."""
        agent = getattr(self, "agent", None)
        if agent is not None:
            agent.request_stop(0.0 if at_once else None)
        service = getattr(self, "service", None)
        if service is not None:
            service.stop()  # the agent's parked claim answers now; deliveries still work
        for t in self._threads:
            if t.name == "herder-agent":
                t.join(timeout=60)
        self._halt.set()
        for t in self._threads:
            t.join(timeout=5)
        self._release()

    def _release(self) -> None:
        store = getattr(self, "store", None)
        if store is not None:
            with contextlib.suppress(Exception):
                store.close()
        if self._log_handler is not None:
            logging.getLogger().removeHandler(self._log_handler)
            self._log_handler.close()
            self._log_handler = None
        self._lock.release()

    def __enter__(self) -> EmbeddedFarm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def inspect_state(state_dir: Path) -> tuple[InProcessClient, Any]:
    """A client over the state an embedded farm left (``herder status`` without --master).

    Returns ``(client, store)``; close the store when done. No agent runs.
    """
    from herder.master.service import MasterService
    from herder.store import Store

    store = Store.open(f"sqlite:///{Path(state_dir) / 'herder.db'}", migrate=True)
    return InProcessClient(MasterService(store)), store
