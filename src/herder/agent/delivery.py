"""Delivery bookkeeping: the journal, settling answered completions, handing back.

- ``_journal`` writes a completion to the agent's journal
  (``herder.agent.journal``) when it is worth keeping across a crash: long
  attempts before their first delivery, every completion whose delivery
  failed, and whatever is undelivered when the agent stops;
- ``_restore_journal`` queues what an earlier run left (before any claim);
- ``_settle`` / ``_forget`` drop attempts once a master answered for them
  (accepted or stale), removing their journal entry and sandbox;
- ``_queue_released`` hands offers back through the outbox (``released``:
  requeued at once, no retry budget used).

The sender that carries the outbox lives in ``herder.agent.claims``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from herder.agent.journal import JournalEntry
from herder.agent.state import AgentCore, Attempt
from herder.api_models import Completion, CompletionResult, Offer

log = logging.getLogger("herder.agent")


class DeliveryMixin(AgentCore):
    def _journal(self, att: Attempt) -> None:
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
            att = Attempt(e.attempt_id, e.completion.token, completion=e.completion)
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

    def _settle(self, done: list[Attempt], results: list[CompletionResult]) -> None:
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

    def _forget(self, att: Attempt) -> None:
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

    def _queue_released(self, offers: list[Offer], error: str = "agent shutting down") -> None:
        """Offers that arrived after stop (or beyond the free slots): hand them straight back
        (through the outbox)."""
        atts = []
        for o in offers:
            att = Attempt.of(o)
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
