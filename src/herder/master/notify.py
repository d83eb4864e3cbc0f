"""Wake long-polling claims when work may have become claimable.

Wake-ups only cut latency (DESIGN §5): every waiter also re-checks on a timer,
so a missed notification (another master queued the work) costs at most that
interval.
"""

from __future__ import annotations

import asyncio


class WorkNotifier:
    def __init__(self) -> None:
        self._event = asyncio.Event()
        self.waiters = 0

    def notify(self) -> None:
        # Swap in a fresh event so waiters that arrive later block again.
        event, self._event = self._event, asyncio.Event()
        event.set()

    async def wait(self, timeout: float) -> bool:
        if timeout <= 0:
            return False
        self.waiters += 1
        try:
            await asyncio.wait_for(self._event.wait(), timeout)
        except TimeoutError:
            return False
        finally:
            self.waiters -= 1
        return True
