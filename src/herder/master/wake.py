"""Talkback wake-ups: tell idle agents that work arrived (DESIGN §4, §5; seeds/002).

When work becomes claimable on this master (a job submitted, a stage
unblocked, a task requeued), parked long-polls *on this master* wake through
the :class:`~herder.master.notify.WorkNotifier`. An agent parked on another
master of the farm learns of it only at that master's recheck (about a second
later). The :class:`Waker` closes that gap: it POSTs ``/talkback/wake`` to the
talkback endpoints of idle agents, and each one sends a claim right away.

Wake-ups only cut latency: correctness never depends on them. A round is
fire-and-forget (short timeout, bounded fan-out, debounced); an unreachable
talkback is logged at debug level and counted, nothing else.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

import httpx

from herder.master.metrics import MasterStats
from herder.store.store import WakeTarget
from herder.tlsconf import TlsWarnings, client_verify

log = logging.getLogger("herder.master.wake")

WAKE_PATH = "/talkback/wake"


@dataclass
class WakeConfig:
    enabled: bool = True
    timeout_s: float = 0.5  # per wake POST: connect + answer
    max_agents: int = 50  # fan-out of one round
    min_interval_s: float = 0.1  # at most one round per interval (debounce)
    # https:// talkback endpoints are verified with this (herder.tlsconf.client_verify):
    # True is the master's --ca ($HERDER_CA), else the system trust store.
    verify: bool | str | ssl.SSLContext = True


class Waker:
    """Debounced, bounded, fire-and-forget wake rounds (runs on the master's event loop).

    ``poke()`` is cheap and never blocks: the first poke after a quiet period
    starts a round at once; pokes during a round or within ``min_interval_s``
    of its start coalesce into one trailing round.

    ``find_targets(limit, exclude)`` returns the agents to wake (a store read,
    run in a worker thread by the caller's wrapper); ``has_work()`` lets a
    round skip when nothing is claimable any more; ``local()`` names the agents
    parked on this master (its notifier wakes them; waking them too would only
    make them send a second claim).
    """

    def __init__(
        self,
        config: WakeConfig,
        stats: MasterStats,
        find_targets: Callable[[int, Iterable[str]], Awaitable[list[WakeTarget]]],
        has_work: Callable[[], Awaitable[bool]],
        local: Callable[[], Iterable[str]] = lambda: (),
    ) -> None:
        self.config = config
        self.stats = stats
        self._find_targets = find_targets
        self._has_work = has_work
        self._local = local
        self._pending = False
        self._task: asyncio.Task[None] | None = None
        self._client: httpx.AsyncClient | None = None
        self._last_round = -1e9
        self._tls = TlsWarnings(log, "wake_tls_failed")

    def poke(self) -> None:
        """Work may have arrived: wake idle agents soon (at most one round per interval)."""
        if not self.config.enabled:
            return
        self._pending = True
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while self._pending:
            wait = self._last_round + self.config.min_interval_s - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            self._pending = False
            self._last_round = time.monotonic()
            try:
                await self.round()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # never let a wake round hurt the master
                self.stats.wake_failures += 1
                log.debug("event=wake_round_failed error=%r", exc)

    async def round(self) -> int:
        """One wake round; returns how many agents answered."""
        if not await self._has_work():
            return 0
        targets = await self._find_targets(self.config.max_agents, set(self._local()))
        if not targets:
            return 0
        self.stats.wake_rounds += 1
        results = await asyncio.gather(*(self._wake(t) for t in targets))
        return sum(results)

    async def _wake(self, target: WakeTarget) -> bool:
        if self._client is None:
            self._client = httpx.AsyncClient(
                timeout=httpx.Timeout(self.config.timeout_s),
                trust_env=False,
                follow_redirects=False,
                limits=httpx.Limits(max_connections=self.config.max_agents),
                verify=client_verify(self.config.verify),
            )
        headers = {"authorization": f"Bearer {target.token}"} if target.token else {}
        url = target.url.rstrip("/") + WAKE_PATH
        self.stats.wakes_sent += 1
        try:
            r = await self._client.post(url, headers=headers, json={})
        except (httpx.HTTPError, OSError) as exc:
            self.stats.wake_failures += 1
            if self._tls.warn(url, exc, agent=target.agent_id):
                return False
            log.debug("event=wake_failed agent=%s url=%s error=%r", target.agent_id, url, exc)
            return False
        if r.status_code >= 400:
            self.stats.wake_failures += 1
            log.debug(
                "event=wake_refused agent=%s url=%s status=%d", target.agent_id, url, r.status_code
            )
            return False
        return True

    async def close(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        if self._client is not None:
            await self._client.aclose()
            self._client = None
