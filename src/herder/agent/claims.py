"""Claiming: the sender, the poller, slot reservations and talkback wakes (DESIGN §4, §10).

- the **sender** delivers the outbox *together with a claim for the slots it
  frees* (one round trip, one transaction for all of them). Completions that
  finish while a request is in flight share the next one; a completion waits
  up to ``batch_wait_s`` for young sibling attempts so that short tasks fall
  into step and share requests. A failed delivery is journaled and retried
  with backoff. A request refused as malformed (or not serializable) never
  blocks the rest: ``_deliver_refused`` isolates the completion at fault;
- the **poller** claims for idle slots when nothing is being delivered
  (long-polling while the farm is idle);
- a talkback **wake** sends an immediate claim that joins the parked poll's
  reservation (``Reservation``).

Acks are piggy-backed: a started attempt's ack waits ``ack_delay_s`` for the
next claim request; a completion implies it.
"""

from __future__ import annotations

import logging
import math
import threading
import time

from herder.agent.config import Backoff, retry_after
from herder.agent.state import (
    AgentCore,
    Attempt,
    Reservation,
    is_client_error,
    is_outcome_unknown,
    is_refused,
)
from herder.api_models import ClaimRequest, Offer

log = logging.getLogger("herder.agent")


class ClaimsMixin(AgentCore):
    # ------------------------------------------------- claim-ahead window

    def _free(self) -> int:
        """Offers the agent may still ask for (lock held): ``slots + window - busy - reserved``."""
        return self.config.slots + self._window() - self._busy - self._reserved

    def _window(self) -> int:
        """Offers to hold beyond the slots right now (lock held).

        Open while the tasks seen lately are short: the median of the last
        run times and the last one below ``claim_ahead_short_s``, and no
        attempt running longer than that; else (and before the first task)
        0, so that an agent never hoards long work. Its size (``_ahead``):
        what the slots run in two claim round trips, at least ``slots``, at
        most ``claim_ahead``.
        """
        ahead = self._ahead
        if (
            ahead
            and self._started
            and time.monotonic() - min(self._started.values()) >= self.config.claim_ahead_short_s
        ):
            return 0
        return ahead

    def _low_water(self) -> int:
        """Send as soon as no more than this many offers wait in the ready queue (lock held).

        Half the window (what the slots run in one round trip), at least the slots.
        """
        return max(self.config.slots, self._ahead // 2)

    def _note_duration(self, seconds: float) -> None:
        """A slot finished an attempt that ran ``seconds`` (lock held): update the window."""
        d = self._durations
        d.append(seconds)
        median = sorted(d)[len(d) // 2]
        cfg = self.config
        cap = cfg.claim_ahead or 0
        if not cap or median >= cfg.claim_ahead_short_s or seconds >= cfg.claim_ahead_short_s:
            self._ahead = 0  # one long task closes it; short ones open it again
            return
        # Enough to keep every slot busy through two refill round trips (a
        # claim's time plus the sender's batching wait), at least one per slot.
        per_trip = cfg.slots * (self._rtt + cfg.batch_wait_s) / max(median, 1e-4)
        self._ahead = min(cap, max(cfg.slots, math.ceil(2 * per_trip)))

    def _trim_ready(self) -> None:
        """Hand back claimed-ahead offers beyond the slots once the window closed.

        They have not started: ``released`` requeues them at once, with no
        retry budget used, for agents with free slots to take.
        """
        with self._lock:
            if self._window():
                return  # open (maybe smaller): what was claimed ahead runs soon enough
            surplus = min(self._busy - self.config.slots, len(self._ready))
            if surplus <= 0:
                return
            back = [self._ready.pop() for _ in range(surplus)]
            self._busy -= surplus
            self._cond.notify_all()
        log.info("event=offers_released count=%d reason=window_closed", len(back))
        self._queue_released(back, "claim-ahead window closed (tasks are long)")

    def _release_ready(self, error: str) -> None:
        """Hand back every offer still waiting for a slot (stopping, draining)."""
        with self._lock:
            back = list(self._ready)
            self._ready.clear()
            self._busy -= len(back)
            self._cond.notify_all()
        if back:
            log.info("event=offers_released count=%d reason=stopping", len(back))
            self._queue_released(back, error)

    # --------------------------------------------------------------- claims

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
        self, n: int, wait_s: float, done: list[Attempt], res: Reservation | None = None
    ) -> list[Offer]:
        """One claim request for ``n`` reserved slots, carrying ``done`` and pending acks.

        Uploads the outputs of ``done`` the master may lack first. On success
        the reservation turns into busy slots and the offers are queued for
        the slot threads; on failure the reservation is released, ``done``
        goes back to the outbox and the exception propagates. ``res``: the
        reservation this request fills (default: its own, of ``n`` slots),
        possibly shared with a talkback wake's claim (see :class:`Reservation`).
        """
        assert self.agent_id is not None
        if res is None:
            res = Reservation(n)
        with self._lock:
            acks = self._take_acks()
        try:
            for att in done:
                if not att.uploaded:
                    try:
                        self._upload(att)
                    except Exception as exc:
                        if not is_client_error(exc):
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
            if is_outcome_unknown(exc):
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
                    self._attempts[o.attempt_id] = Attempt.of(o)
                self._ready.extend(offers)
                self._slot_cond.notify(len(offers))
            self._unreserve(res)
            stopping = self._stop.is_set()
            self._cond.notify_all()
        if late:
            if stopping:
                self._queue_released(late)
            else:
                log.info("event=offers_released count=%d reason=no_free_slot", len(late))
                self._queue_released(late, "no free slot on the agent (a wake claimed in parallel)")
        return offers

    def _unreserve(self, res: Reservation) -> None:
        """A request of ``res`` finished; the last one returns what is left (lock held)."""
        res.claims -= 1
        if res.claims <= 0:
            self._reserved -= res.n
            res.n = 0

    # ------------------------------------------------- sender and poller

    def _send_loop(self) -> None:
        """Deliver completions, each request claiming the slots they freed (§10).

        Completions that finish while a request is in flight ride on the next
        one together (one request, one transaction for several tasks), and the
        same request tops the claim-ahead window up. The first completion
        waits for more to join it: up to ``ahead_wait_s`` while more than
        half the window (``_low_water``) is claimed ahead and waiting, so the
        slots stay busy through the round trip; with nothing claimed ahead,
        up to ``batch_wait_s`` while attempts that started less than
        ``batch_young_s`` ago still run. Long tasks are never waited for.
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
                    waiting = len(self._ready)
                    low = self._low_water()
                    # Claimed ahead enough to keep the slots busy through a round
                    # trip: batch more (up to ahead_wait_s). Nothing claimed
                    # ahead: wait up to batch_wait_s, for young siblings only.
                    wait_s = cfg.ahead_wait_s if waiting > low else cfg.batch_wait_s
                    linger = self._outbox_since + wait_s - now
                    if (
                        linger > 0
                        and not retry_at
                        and not self._stop.is_set()
                        and (
                            waiting > low
                            or (
                                not waiting
                                and any(t > now - cfg.batch_young_s for t in self._started.values())
                            )
                        )
                    ):
                        self._send_cond.wait(linger)
                        continue
                    break
                done, self._outbox = self._outbox, []
                self._outbox_since = 0.0
                n = 0 if self._stop.is_set() else max(self._free(), 0)
                self._reserved += n
                self._sending = True
            t0 = time.monotonic()
            try:
                self._claim(n, 0.0, done)
                self._rtt = 0.8 * self._rtt + 0.2 * (time.monotonic() - t0)
            except Exception as exc:
                if is_refused(exc):
                    # Malformed, too large or not serializable: isolate the culprit
                    # (herder.agent.delivery); never retried as it is.
                    transient = self._deliver_refused(done, exc)
                    if transient is None:
                        continue
                    delay = backoff.next(retry_after(transient))
                    retry_at = time.monotonic() + delay
                    log.warning(
                        "event=delivery_failed error=%r retry_in_s=%.2f", str(transient), delay
                    )
                    continue
                if is_client_error(exc):
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
                delay = backoff.next(retry_after(exc))
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
                res = self._parked = Reservation(n)  # a talkback wake may join it
                self._woken = False
            try:
                self._claim(n, cfg.poll_wait_s, [], res)
            except Exception as exc:
                delay = backoff.next(retry_after(exc))
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
          reservation, plus any slot nobody reserved (:class:`Reservation`).
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

    def _wake_claim(self, n: int, res: Reservation) -> None:
        try:
            offers = self._claim(n, 0.0, [], res)
            log.debug("event=wake_claim offers=%d", len(offers))
        except Exception as exc:  # latency only: the parked poll still claims
            log.debug("event=wake_claim_failed error=%r", str(exc))
