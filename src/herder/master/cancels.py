"""Talkback cancels: kill the attempts of a stopped job on their agents now (DESIGN §4, §5).

When a job fails or is cancelled, the store cancels its offered and running
attempts in the same transaction and announces them after the commit
(``herder.store.stops``). The :class:`CancelSender` then POSTs
``/talkback/cancel {"attempt_id": N}`` to each agent concerned, so the
processes die within a round trip instead of running on until the agent's
next heartbeat, whose answer lists them in ``cancel`` anyway.

Like the wake-ups (``herder.master.wake``) this is fire-and-forget on the
master's event loop, off the request path: a short timeout, a bounded number
of POSTs in flight, an unreachable agent logged at debug level and counted.
Correctness never depends on it.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Sequence
from dataclasses import dataclass

import httpx

from herder.store.stops import CancelledAttempt
from herder.tlsconf import TlsWarnings, client_verify

log = logging.getLogger("herder.master.cancels")

CANCEL_PATH = "/talkback/cancel"


@dataclass
class CancelConfig:
    enabled: bool = True
    # per POST: connect (a TLS handshake with a loaded agent can take a second) + answer
    timeout_s: float = 2.0
    max_in_flight: int = 50  # POSTs at once, over every batch
    max_pending: int = 10_000  # cancels queued beyond that are left to the heartbeats
    # https:// talkback endpoints are verified with this (herder.tlsconf.client_verify):
    # True is the master's --ca ($HERDER_CA), else the system trust store.
    verify: bool | str | ssl.SSLContext = True


class CancelSender:
    """Sends talkback cancels from the master's event loop.

    ``submit()`` may be called from any thread (the store announces cancels
    in the thread that committed them); it never blocks. ``bind(loop)`` must
    be called once the loop runs (the app's lifespan); before that, and after
    ``close()``, cancels are left to the agents' heartbeats.
    """

    def __init__(self, config: CancelConfig | None = None) -> None:
        self.config = config or CancelConfig()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: httpx.AsyncClient | None = None
        self._slots: asyncio.Semaphore | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._pending = 0
        self.sent = 0
        self.failed = 0
        self.skipped = 0  # no talkback endpoint, or too many pending: the heartbeat tells them
        self._tls = TlsWarnings(log, "talkback_cancel_tls_failed")

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def submit(self, cancelled: Sequence[CancelledAttempt]) -> None:
        """Thread-safe: send these cancels soon (on the bound loop)."""
        loop = self._loop
        if not self.config.enabled or loop is None or loop.is_closed():
            self.skipped += len(cancelled)
            return
        items = list(cancelled)
        try:
            loop.call_soon_threadsafe(self._start, items)
        except RuntimeError:  # the loop closed meanwhile: shutting down
            self.skipped += len(items)

    def _start(self, items: list[CancelledAttempt]) -> None:
        for item in items:
            if not item.talkback_url:
                self.skipped += 1
                continue
            if self._pending >= self.config.max_pending:
                self.skipped += 1
                log.debug("event=talkback_cancel_dropped attempt=%d", item.attempt_id)
                continue
            self._pending += 1
            task = asyncio.get_running_loop().create_task(self._send(item))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _send(self, item: CancelledAttempt) -> None:
        try:
            if self._slots is None:
                self._slots = asyncio.Semaphore(self.config.max_in_flight)
            async with self._slots:
                await self._post(item)
        finally:
            self._pending -= 1

    async def _post(self, item: CancelledAttempt) -> bool:
        if self._client is None:
            self._client = httpx.AsyncClient(
                timeout=httpx.Timeout(self.config.timeout_s),
                trust_env=False,
                follow_redirects=False,
                limits=httpx.Limits(max_connections=self.config.max_in_flight),
                verify=client_verify(self.config.verify),
            )
        assert item.talkback_url is not None
        url = item.talkback_url.rstrip("/") + CANCEL_PATH
        headers = {"authorization": f"Bearer {item.talkback_token}"} if item.talkback_token else {}
        body = {"attempt_id": item.attempt_id, "reason": item.reason[:500]}
        self.sent += 1
        try:
            r = await self._client.post(url, headers=headers, json=body)
        except (httpx.HTTPError, OSError) as exc:
            self.failed += 1
            if self._tls.warn(url, exc, agent=item.agent_id):
                return False
            log.debug(
                "event=talkback_cancel_failed agent=%s attempt=%d url=%s error=%r",
                item.agent_id,
                item.attempt_id,
                url,
                exc,
            )
            return False
        if r.status_code >= 400:
            # 404: the agent does not run it (finished, or not received yet); the
            # fencing of its ack, log or completion stops it if it starts later.
            self.failed += 1
            log.debug(
                "event=talkback_cancel_refused agent=%s attempt=%d status=%d",
                item.agent_id,
                item.attempt_id,
                r.status_code,
            )
            return False
        log.info("event=talkback_cancel agent=%s attempt=%d", item.agent_id, item.attempt_id)
        return True

    async def close(self) -> None:
        self._loop = None
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()
            self._client = None
