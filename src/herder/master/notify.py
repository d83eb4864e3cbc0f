"""Wake-ups for waiters in threads and in asyncio alike.

A :class:`Signal` counts generations: a waiter reads ``generation`` before it
looks at the database, then waits until the generation moves on, so a
notification that lands between the look and the wait is never missed.
Wake-ups only cut latency (DESIGN §5): waiters also re-check on a timer, so a
missed notification (another master queued the work) costs at most that
interval.
"""

from __future__ import annotations

import asyncio
import threading


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class Signal:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._gen = 0
        self._async: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = {}
        self._next_key = 0
        self.waiters = 0

    @property
    def generation(self) -> int:
        return self._gen

    def notify(self) -> None:
        """Wake every current waiter (safe from any thread)."""
        with self._cond:
            self._gen += 1
            if self.waiters:
                self._cond.notify_all()
            pending = list(self._async.values())
            self._async.clear()
        for loop, fut in pending:
            try:
                loop.call_soon_threadsafe(_wake, fut)
            except RuntimeError:  # that loop is closed: nobody waits there any more
                pass

    def wait(self, generation: int, timeout: float) -> bool:
        """Block until the generation differs from ``generation``; False on timeout."""
        if timeout <= 0:
            return self._gen != generation
        with self._cond:
            self.waiters += 1
            try:
                return self._cond.wait_for(lambda: self._gen != generation, timeout)
            finally:
                self.waiters -= 1

    async def wait_async(self, generation: int, timeout: float) -> bool:
        """``wait`` for a coroutine: holds no thread while it waits."""
        if timeout <= 0:
            return self._gen != generation
        loop = asyncio.get_running_loop()
        with self._cond:
            if self._gen != generation:
                return True
            fut: asyncio.Future[None] = loop.create_future()
            key = self._next_key
            self._next_key += 1
            self._async[key] = (loop, fut)
            self.waiters += 1
        try:
            await asyncio.wait_for(fut, timeout)
            return True
        except TimeoutError:
            return self._gen != generation
        finally:
            with self._cond:
                self._async.pop(key, None)
                self.waiters -= 1
