"""Delivery bookkeeping: the journal, settling answered completions, handing back.

- ``_journal`` writes a completion to the agent's journal
  (``herder.agent.journal``) when it is worth keeping across a crash: long
  attempts before their first delivery, every completion whose delivery
  failed, and whatever is undelivered when the agent stops;
- ``_restore_journal`` queues what an earlier run left (before any claim);
- ``_settle`` / ``_forget`` drop attempts once a master answered for them
  (accepted or stale), removing their journal entry and sandbox;
- ``_queue_released`` hands offers back through the outbox (``released``:
  requeued at once, no retry budget used);
- ``_deliver_refused``: a request the master refused as malformed (400, 413,
  422) or that could not be serialized. No single completion may block the
  others or be retried forever: each is checked as the master would, then
  sent alone; one refused is replaced once by a minimal failure (its error
  says why); if that is refused too, it is dropped and its journal entry
  quarantined (``herder.agent.journal``).

The sender that carries the outbox lives in ``herder.agent.claims``.
"""

from __future__ import annotations

import logging
import os
import stat
import time
from pathlib import Path

from pydantic import ValidationError

from herder.agent.journal import JournalEntry
from herder.agent.state import AgentCore, Attempt, clip, is_refused, printable
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
        except (OSError, ValueError) as exc:  # ValueError: a value JSON cannot hold
            log.error("event=journal_write_failed attempt=%d error=%r", att.id, str(exc))
            return
        att.journaled = True
        self.stats["journaled"] += 1
        log.debug("event=journaled attempt=%d", att.id)

    def _restore_journal(self, entries: list[JournalEntry]) -> None:
        """Queue the completions an earlier run could not deliver (before any claim)."""
        atts = []
        for e in entries:
            foreign = _foreign_blob(self.executor.sandbox_path(e.attempt_id), e.blobs)
            if foreign is not None:  # never read a device or someone else's file as output
                reason = f"unreadable: blob file {foreign!r} is not a file of the attempt's sandbox"
                self.journal.quarantine(e.attempt_id, reason)
                continue
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

    # ------------------------------------------------ refused completions

    def _deliver_refused(self, done: list[Attempt], exc: BaseException) -> BaseException | None:
        """The request carrying ``done`` was refused (``is_refused(exc)``); deliver them anyway.

        Runs on the sender thread (``_claim`` has put ``done`` back in the
        outbox). Completions that do not survive the master's validation here
        are replaced by minimal failures and the batch goes back to the
        sender; a batch the master refuses for a reason not visible here is
        sent one completion at a time. Returns None when ``done`` is dealt
        with, else the transient error that stopped it (what is left of
        ``done`` is back in the outbox and journaled; the sender backs off).
        """
        with self._cond:
            self._outbox = [a for a in self._outbox if a not in done]
        log.warning(
            "event=completions_refused attempts=%s error=%r",
            [a.id for a in done],
            printable(str(exc)),
        )
        fixed = False
        for att in done:
            problem = completion_problem(att.completion)
            if problem is not None:
                fixed = True
                if att.refused is None:
                    self._replace_refused(att, problem)
                else:
                    self._drop_refused(att, problem)
        left = [a for a in done if a.completion is not None]
        if len(left) == 1 and not fixed:  # it was refused on its own
            if left[0].refused is None:
                self._replace_refused(left[0], _reason(exc))
            else:
                self._drop_refused(left[0], _reason(exc))
        elif not fixed:
            return self._deliver_alone(left)
        self._requeue(left)
        return None

    def _deliver_alone(self, done: list[Attempt]) -> BaseException | None:
        """One request per completion; each refused one is replaced, then dropped."""
        for i, att in enumerate(done):
            while att.completion is not None:
                try:
                    self._claim(0, 0.0, [att])
                    break
                except Exception as exc:
                    with self._cond:
                        self._outbox = [a for a in self._outbox if a is not att]
                    if not is_refused(exc):
                        rest = done[i:]
                        for a in rest:
                            self._journal(a)
                        self._requeue(rest)
                        return exc
                    if att.refused is None:
                        self._replace_refused(att, _reason(exc))
                    else:
                        self._drop_refused(att, _reason(exc))
        return None

    def _requeue(self, atts: list[Attempt]) -> None:
        with self._cond:
            self._outbox[:0] = [a for a in atts if a.completion is not None]
            if self._outbox:
                self._outbox_since = self._outbox_since or time.monotonic()

    def _replace_refused(self, att: Attempt, reason: str) -> None:
        """Swap ``att``'s completion for a minimal infrastructure failure saying why."""
        reason = printable(reason)
        log.error("event=completion_refused attempt=%d error=%r", att.id, reason)
        try:
            att.completion = Completion(
                attempt_id=att.id,
                token=att.token,
                outcome="launch_failed",
                error=clip(f"agent error: the completion cannot be delivered: {reason}"),
            )
        except ValidationError as exc:  # e.g. a journaled token no master issued
            self._drop_refused(att, f"{reason}; no minimal completion either: {_reason(exc)}")
            return
        att.refused = reason
        att.blobs, att.uploaded = {}, True

    def _drop_refused(self, att: Attempt, reason: str) -> None:
        """Give up on ``att``: even its minimal completion is refused. The master
        requeues the attempt when the heartbeat no longer lists it."""
        reason = printable(reason)
        log.error("event=completion_dropped attempt=%d error=%r", att.id, reason)
        entry = None
        if att.completion is not None:
            entry = JournalEntry(completion=att.completion, agent_id=self.agent_id)
        self.journal.quarantine(att.id, f"undeliverable: {reason}", entry)
        att.journaled = False
        att.completion = None
        self.stats["dropped"] = self.stats.get("dropped", 0) + 1
        self._forget(att)


def _foreign_blob(sandbox: Path, blobs: dict[str, str]) -> str | None:
    """The first of ``blobs`` (digest -> file) that is not a regular file inside ``sandbox``."""
    root = os.path.realpath(sandbox) + os.sep
    for path in blobs.values():
        real = os.path.realpath(path)
        if not real.startswith(root):
            return path
        try:
            mode = os.stat(real).st_mode
        except FileNotFoundError:
            continue  # gone: delivered as lost outputs (herder.agent.slots)
        except OSError:
            return path
        if not stat.S_ISREG(mode):
            return path
    return None


def completion_problem(c: Completion | None) -> str | None:
    """Why the master would refuse ``c`` (it must serialize and validate), or None."""
    if c is None:
        return None
    try:
        # The model's rules first (they name the field), then what JSON cannot carry.
        Completion.model_validate(c.model_dump())
        c.model_dump_json()
    except (ValueError, UnicodeError) as exc:  # serialization errors are ValueErrors too
        return _reason(exc)
    return None


def _reason(exc: BaseException) -> str:
    """One printable line for a refusal: the first validation error, or the message."""
    if isinstance(exc, ValidationError) and exc.errors():
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        text = f"{where}: {first['msg']}" if where else str(first["msg"])
    else:
        text = str(exc)
    return clip(" ".join(printable(text).split()))
