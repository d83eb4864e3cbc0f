"""Leases and the agent's side channels: heartbeat, cancel, drain order, acks, logs.

- the **heartbeat** thread heartbeats at once (it tells the master's lease
  length), then every lease / 3: it lists every attempt the agent holds
  (running, or claimed ahead and waiting for a slot) so the master renews
  their leases and reconciles (DESIGN §5), reports resource usage, kills the
  attempts the master says to cancel, and obeys a drain order;
- the **log shipper** sends new stdout/stderr of running attempts every
  ``log_interval_s`` and the acks no claim carried within ``ack_delay_s``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time

from herder.agent.config import Backoff, retry_after
from herder.agent.state import (
    LOG_BATCH,
    AgentCore,
    is_outcome_unknown,
    is_stale,
    merge_chunks,
)
from herder.api_models import Heartbeat, HeartbeatResponse, ResourceUsage, RunningAttempt

log = logging.getLogger("herder.agent")


class HeartbeatMixin(AgentCore):
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
                retry_in = min(backoff.next(retry_after(exc)), self._hb_interval())
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
                RunningAttempt(
                    attempt_id=a.id,
                    token=a.token,
                    progress=a.execution.progress if a.execution is not None else None,
                )
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
            self._trim_ready()  # a task claimed ahead turned out long: hand back the rest

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
                if is_stale(exc):
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
                chunks = merge_chunks(att.unsent + new)
                if not chunks:
                    continue
                try:
                    self.client.append_log(att.id, att.token, chunks)
                    att.unsent = []
                except Exception as exc:
                    if is_stale(exc):
                        att.unsent = []
                        self.cancel_attempt(att.id, "stale attempt (log refused)")
                    elif is_outcome_unknown(exc):
                        att.unsent = []  # may have arrived; resending could duplicate it
                    else:
                        att.unsent = chunks
            finally:
                ex.log_lock.release()
