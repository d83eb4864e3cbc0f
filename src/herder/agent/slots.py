"""Slot threads: take an offer from the ready queue, run it, make its completion.

``slots`` threads (started once) each run one attempt at a time: cache the
offer's inline inputs, stage and run the command (``herder.agent.executor``),
read the rest of its log, turn small outputs into inline blobs (or upload big
ones), and put the completion in the outbox for the sender
(``herder.agent.claims``). Slot threads never talk to the master about claims.
"""

from __future__ import annotations

import logging
import time

from herder.agent.execspec import ExecResult, ExecSpec
from herder.agent.executor import Execution, StagingError
from herder.agent.state import (
    LOG_BATCH,
    AgentCore,
    Attempt,
    clip,
    is_client_error,
    is_stale,
    merge_chunks,
)
from herder.api_models import (
    INLINE_OUTPUT_MAX,
    INLINE_TOTAL_MAX,
    Completion,
    LogChunk,
    Offer,
    decode_inline,
    encode_inline,
)

log = logging.getLogger("herder.agent")


class SlotsMixin(AgentCore):
    def _slot_loop(self) -> None:
        """One of ``slots`` threads: run offers from the ready queue, one at a time."""
        while True:
            with self._cond:
                while True:
                    offer = self._take_fitting()
                    if offer is not None or self._halt.is_set():
                        break
                    self._slot_cond.wait()
                if offer is None:
                    if not self._ready:
                        return
                    offer = self._ready.popleft()  # halting: it is released, not run
                    self._reserve(offer, 1)
                self._started[offer.attempt_id] = time.monotonic()
            try:
                self._run_one(offer)
            finally:
                with self._cond:
                    self._reserve(offer, -1)
                    if self._ready:
                        self._slot_cond.notify()  # what waited for room may fit now

    def _take_fitting(self) -> Offer | None:
        """The first ready offer that fits what the running ones leave free (under the lock).

        The master fits what it offers within the free slots (herder.core.schedule);
        offers claimed ahead wait here until they fit, so the agent never runs
        more cpus, RAM or GPUs than it has at once. With nothing running, the
        first offer runs whatever it asks (the master checked it fits at all).
        """
        if not self._ready:
            return None
        cfg = self.config
        cpus, ram, gpus = self._running_use
        idle = cpus == 0 and ram == 0 and gpus == 0
        cpu_cap = max(cfg.cpus, cfg.slots)
        ram_cap = min(cfg.ram_mb, cfg.max_ram_mb) if cfg.max_ram_mb else cfg.ram_mb
        for i, offer in enumerate(self._ready):
            if idle or (
                cpus + offer.cpus <= cpu_cap
                and gpus + offer.gpus <= cfg.gpus
                and (ram_cap <= 0 or ram + offer.ram_mb <= ram_cap)
            ):
                del self._ready[i]
                self._reserve(offer, 1)
                return offer
        return None

    def _reserve(self, offer: Offer, sign: int) -> None:
        cpus, ram, gpus = self._running_use
        self._running_use = (
            cpus + sign * offer.cpus,
            ram + sign * offer.ram_mb,
            gpus + sign * offer.gpus,
        )

    def _run_one(self, offer: Offer) -> None:
        with self._lock:
            att = self._attempts.get(offer.attempt_id)
            if att is None:
                att = self._attempts[offer.attempt_id] = Attempt.of(offer)
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
                error=clip(f"agent error: {exc!r}"),
            )
        att.completion = completion
        if not att.stale and (res.duration_s >= self.config.journal_min_s or self._stop.is_set()):
            self._journal(att)  # worth keeping across a crash before the master answers
        slots = self.config.slots
        with self._cond:
            self._busy -= 1
            self._started.pop(att.id, None)
            self._acks.pop(att.id, None)  # the completion implies the ack
            if res.outcome in ("exited", "timeout"):
                self._note_duration(res.duration_s)
            discard = att.stale
            if not discard:
                # One sender wake per batch: the first completion starts its
                # linger; later ones only when the slots may soon run dry.
                if not self._outbox:
                    self._outbox_since = time.monotonic()
                    self._send_cond.notify()
                elif len(self._ready) <= self._low_water():
                    self._send_cond.notify()
                self._outbox.append(att)
            if discard or self._stop.is_set():
                self._cond.notify_all()
            trim = self._ready and self._busy > slots and not self._window()
        if discard:
            log.info("event=attempt_discarded attempt=%d", att.id)
            self._forget(att)
        if trim:
            self._trim_ready()

    def _execute(self, att: Attempt, ex: Execution) -> ExecResult:
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

    def _inline_outputs(self, att: Attempt, res: ExecResult) -> dict[str, str]:
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

    def _make_completion(self, att: Attempt, ex: Execution, res: ExecResult) -> Completion:
        if res.outputs_failed:
            # A command failure (retries count): the same command fails the same
            # way anywhere. Exit status 0 would read as success, so it is left out.
            log.warning("event=outputs_refused attempt=%d error=%r", att.id, res.error)
            exited0 = res.exit_code == 0
            return Completion(
                attempt_id=att.id,
                token=att.token,
                outcome=res.outcome,
                exit_code=None if exited0 else res.exit_code,
                error=clip(f"{res.error}{' (the command exited 0)' if exited0 else ''}"),
                log=self._final_log(att, ex),
            )
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
                    error=clip(f"cannot upload outputs: {refused}"),
                    log=self._final_log(att, ex),
                )
        # Every field is valid by construction (the offer's token, clipped error,
        # inline blobs within INLINE_TOTAL_MAX): skip re-validating (and
        # re-decoding the inline blobs) once per task.
        return Completion.model_construct(
            attempt_id=att.id,
            token=att.token,
            outcome=res.outcome,
            exit_code=res.exit_code,
            error=clip(res.error) if res.error else None,
            outputs=outputs,
            log=self._final_log(att, ex),
            blobs=inline,
            peak_rss_mb=res.peak_rss_mb,
            progress=res.progress,
        )

    def _upload_outputs(self, att: Attempt, res: ExecResult) -> str | None:
        """Upload outputs from the slot thread; the master's refusal, or None.

        A transient failure is not a refusal: the sender uploads before
        delivering (and retries).
        """
        att.blobs = {of.digest: path for of, path in res.outputs}
        att.uploaded = False
        try:
            self._upload(att)
        except Exception as exc:
            if is_client_error(exc):
                log.error("event=upload_failed attempt=%d error=%r", att.id, str(exc))
                att.blobs, att.uploaded = {}, True
                return str(exc)
            log.warning("event=upload_deferred attempt=%d error=%r", att.id, str(exc))
        return None

    def _upload(self, att: Attempt) -> None:
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

    def _drop_outputs(self, att: Attempt, error: str) -> None:
        """Replace ``att``'s completion by an infrastructure failure without outputs."""
        assert att.completion is not None
        att.completion = Completion(
            attempt_id=att.id,
            token=att.token,
            outcome="launch_failed",
            exit_code=att.completion.exit_code,
            error=clip(error),
            log=att.completion.log,
        )
        att.blobs, att.uploaded = {}, True

    def _final_log(self, att: Attempt, ex: Execution) -> list[LogChunk]:
        """Everything not shipped yet; big remainders go out by append_log first."""
        with ex.log_lock:
            chunks = list(att.unsent)
            att.unsent = []
            while True:
                new, more = ex.read_logs(limit=LOG_BATCH, final=True)
                chunks.extend(new)
                if not more:
                    return merge_chunks(chunks)
                if sum(len(c.data) for c in chunks) >= LOG_BATCH and not att.stale:
                    try:
                        self.client.append_log(att.id, att.token, merge_chunks(chunks))
                        chunks = []
                    except Exception as exc:
                        if is_stale(exc):
                            att.stale = True
