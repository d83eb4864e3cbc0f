"""What a master does, whatever carries the request (DESIGN §1, §10).

:class:`MasterService` is the one implementation of the master's behaviour
beyond the store's transactions: the wake-ups of parked claims and of
followers, submissions with inline files, claims that long-poll, follows
that long-poll. The HTTP API (``herder.master.app``) calls it from asyncio;
the embedded farm of ``herder run`` (``herder.embedded``) calls it from the
agent's and the build's threads. Both run the same store transactions.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from herder.api_models import JobSubmit, decode_inline
from herder.errors import InvalidRequest
from herder.master.notify import Signal
from herder.records import FINAL_TASK_STATES, FollowPage, Submitted

if TYPE_CHECKING:
    from herder.api_models import (
        ClaimRequest,
        Completion,
        CompletionResult,
        Heartbeat,
        HeartbeatResponse,
        JobView,
    )
    from herder.store import ClaimOutcome, Store
    from herder.store.control import JobChanges
    from herder.store.stops import CancelledAttempt

log = logging.getLogger("herder.master")


def check_remote_only(spec: JobSubmit) -> None:
    """A farm queues remote tasks only: local ones run on the submitting client."""
    for si, stage in enumerate(spec.stages):
        for ti, task in enumerate(stage.tasks):
            if task.placement == "local":
                raise InvalidRequest(
                    f"stages.{si}.tasks.{ti}.placement: 'local' tasks run on the submitting "
                    "client and cannot be queued on a farm; submit remote tasks only"
                )


class MasterService:
    """The master's behaviour over one store; thread-safe."""

    def __init__(
        self,
        store: Store,
        *,
        recheck_interval_s: float = 1.0,
        on_work: Callable[[], None] | None = None,
        on_cancel: Callable[[Sequence[CancelledAttempt]], None] | None = None,
    ) -> None:
        self.store = store
        self.recheck_interval_s = recheck_interval_s
        self.work = Signal()  # tasks may have become claimable
        self.changed = Signal()  # task states changed: followers look again
        self.stopping = False
        self._on_work = on_work
        # Attempts cancelled while offered or running (a job failed or was
        # cancelled): tell their agents to kill them now, e.g. talkback cancel
        # (herder.master.cancels) or the embedded farm's in-process agent. The
        # store announces them after each commit, whatever transaction it was.
        self._on_cancel = on_cancel
        if on_cancel is not None:
            store.add_cancel_listener(self._attempts_cancelled)
        # Agents with a claim parked here (their wake-up is the work signal).
        self.parked: dict[str, int] = {}
        self._parked_lock = threading.Lock()

    def stop(self) -> None:
        """Answer every parked claim and follow at once (shutdown)."""
        self.stopping = True
        self.work.notify()
        self.changed.notify()

    def close(self) -> None:
        """Stop hearing of the store's cancels (the store may outlive this service)."""
        if self._on_cancel is not None:
            self.store.remove_cancel_listener(self._attempts_cancelled)

    def _attempts_cancelled(self, cancelled: Sequence[CancelledAttempt]) -> None:
        """After a commit that cancelled offered or running attempts (never blocks)."""
        log.info(
            "event=attempts_cancelled count=%d agents=%d",
            len(cancelled),
            len({c.agent_id for c in cancelled}),
        )
        self.changed.notify()
        if self._on_cancel is not None:
            self._on_cancel(cancelled)

    def work_arrived(self) -> None:
        self.work.notify()
        if self._on_work is not None:
            self._on_work()

    # ------------------------------------------------------------------ jobs

    def submit(self, spec: JobSubmit, *, hold_inputs: bool = False) -> Submitted:
        """Store the job (and its inline files); the same idempotency key, the same job.

        ``hold_inputs``: the job waits for required blobs not stored yet
        (herder.store.inputs; ``inputs=later`` of ``POST /jobs``)."""
        check_remote_only(spec)
        if spec.blobs:
            try:
                found = decode_inline(spec.blobs)
            except ValueError as exc:
                raise InvalidRequest(f"blobs: {exc}") from None
            self.store.put_blobs(found)
        sub = _submit(self.store, spec, hold_inputs)
        if sub.created:
            self.work_arrived()
            self.changed.notify()
        return sub

    def submit_view(self, spec: JobSubmit) -> tuple[JobView, bool]:
        sub = self.submit(spec)
        return self.store.get_job(sub.id), sub.created

    def cancel_job(self, job_id: int, reason: str = "cancelled by user") -> JobView:
        view = self.store.cancel_job(job_id, reason)
        self.changed.notify()
        return view

    def pause_job(self, job_id: int, kill: bool = False) -> JobView:
        """Nothing of the job starts any more; with ``kill`` its running tasks are requeued now."""
        view = self.store.pause_job(job_id, kill=kill)
        log.info("event=job_paused job_id=%d kill=%s", job_id, kill)
        self.changed.notify()
        return view

    def resume_job(self, job_id: int) -> JobView:
        view = self.store.resume_job(job_id)
        log.info("event=job_resumed job_id=%d", job_id)
        self.work_arrived()
        self.changed.notify()
        return view

    def retry_job(self, job_id: int) -> JobView:
        view = self.store.retry_job(job_id)
        log.info("event=job_retried job_id=%d", job_id)
        self.work_arrived()
        self.changed.notify()
        return view

    def update_job(self, job_id: int, changes: JobChanges) -> JobView:
        view = self.store.update_job(job_id, changes)
        log.info(
            "event=job_updated job_id=%d fields=%s", job_id, ",".join(sorted(changes.fields()))
        )
        self.work_arrived()  # a task may fit an agent now (tags, cpus, ram)
        self.changed.notify()
        return view

    def follow(
        self, job_id: int, after: int = 0, limit: int = 1000, include_events: bool = False
    ) -> FollowPage:
        return self.store.follow_page(job_id, after, limit, include_events=include_events)

    def follow_wait(
        self,
        job_id: int,
        after: int = 0,
        wait_s: float = 20.0,
        limit: int = 1000,
        include_events: bool = False,
    ) -> FollowPage:
        """``follow``, waiting up to ``wait_s`` for something to happen (threads)."""
        deadline = time.monotonic() + wait_s
        while True:
            gen = self.changed.generation
            page = self.follow(job_id, after, limit, include_events)
            remaining = deadline - time.monotonic()
            if page.moved(after) or self.stopping or remaining <= 0:
                return page
            self.changed.wait(gen, min(remaining, self.recheck_interval_s))

    # ----------------------------------------------------------- agent cycle

    def claim_once(
        self,
        agent_id: str,
        max_tasks: int,
        completions: Sequence[Completion] = (),
        acks: Sequence[int] = (),
    ) -> ClaimOutcome:
        """One claim transaction (completions, acks, offers), and the wake-ups it calls for."""
        store = self.store
        if not completions and not acks and not store.has_claimable_work():
            # An idle poll with nothing to deliver probes the claim index (a read)
            # instead of queueing for the write lock only to find nothing.
            from herder.store import ClaimOutcome

            # NotFound for an unknown agent
            return ClaimOutcome(drain=store.agent_state(agent_id) == "draining")
        out = store.claim(agent_id, self._fair_share(agent_id, max_tasks), completions, acks)
        if out.woke:
            self.work_arrived()
        if completions or acks or out.offers:
            self.changed.notify()
        return out

    def claim_wait(self, agent_id: str, req: ClaimRequest) -> ClaimOutcome:
        """A claim that long-polls up to ``req.wait_s`` for offers (threads)."""
        deadline = time.monotonic() + req.wait_s
        gen = self.work.generation
        out = self.claim_once(agent_id, req.max_tasks, req.completions, req.acks)
        if out.offers or req.max_tasks <= 0 or req.wait_s <= 0:
            return out
        with self.parking(agent_id):
            while not out.offers and not self.stopping:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                woke = self.work.wait(gen, min(remaining, self.recheck_interval_s))
                gen = self.work.generation
                if self.stopping:
                    break
                if not woke and not self.store.has_claimable_work():
                    continue
                nxt = self.claim_once(agent_id, req.max_tasks)
                out.offers, out.drain = nxt.offers, nxt.drain
        return out

    def _fair_share(self, agent_id: str, max_tasks: int) -> int:
        """Leave idle agents their share: with ``n`` other agents parked here, claim 1/(n+1).

        An agent asks for its free slots plus a claim-ahead window (DESIGN §10);
        taken whole, a stage of short tasks that just unblocked would all go to
        the agent whose completion unblocked it while the others sit parked.
        """
        if max_tasks <= 1:
            return max_tasks
        with self._parked_lock:
            others = len(self.parked) - (agent_id in self.parked)
        return -(-max_tasks // (others + 1)) if others > 0 else max_tasks

    def parked_claims(self) -> int:
        """How many claims are parked here now (a gauge in ``/metrics``)."""
        with self._parked_lock:
            return sum(self.parked.values())

    @contextlib.contextmanager
    def parking(self, agent_id: str) -> Iterator[None]:
        """Count a claim of ``agent_id`` as parked here while it waits (``parked``)."""
        with self._parked_lock:
            self.parked[agent_id] = self.parked.get(agent_id, 0) + 1
        try:
            yield
        finally:
            with self._parked_lock:
                left = self.parked.get(agent_id, 0) - 1
                if left > 0:
                    self.parked[agent_id] = left
                else:
                    self.parked.pop(agent_id, None)

    def complete(self, c: Completion) -> CompletionResult:
        result, woke = self.store.complete(c)
        if woke:
            self.work_arrived()
        if result.result != "stale":
            self.changed.notify()
        return result

    def ack(self, attempt_id: int, token: str) -> None:
        self.store.ack(attempt_id, token)
        self.changed.notify()

    def heartbeat(self, agent_id: str, hb: Heartbeat) -> HeartbeatResponse:
        resp = self.store.heartbeat(agent_id, hb)
        # Reconciliation may have requeued or started attempts.
        self.changed.notify()
        return resp

    def maintain(self, holder: str, ttl_s: float) -> int | None:
        n = self.store.maintain(holder, ttl_s)
        if n:
            self.work_arrived()
            self.changed.notify()
        if n is not None:  # the lock holder also prunes (retention), when a round is due
            self.store.prune_due(holder, ttl_s)
        return n

    def job_over(self, job_id: int) -> bool:
        return self.follow(job_id, 0, 1).state in FINAL_TASK_STATES


def _submit(store: Any, spec: JobSubmit, hold_inputs: bool = False) -> Submitted:
    fn = getattr(store, "submit", None)
    if fn is not None:
        sub = fn(spec, hold_inputs=True) if hold_inputs else fn(spec)
        return Submitted(int(sub.id), bool(sub.created), list(sub.task_ids))
    view, created = store.submit_job(spec)
    return Submitted(view.id, created, [t.id for s in view.stages for t in s.tasks])
