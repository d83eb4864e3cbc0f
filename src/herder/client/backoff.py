"""Capped binary exponential backoff with full jitter (seeds/003, DESIGN §6).

Shared by the agent's master client (``herder.agent.autonomous``) and the
outage riding of the client's request loop (``herder.client.outage``), and
importable from ``herder.client.discovery`` as before.
"""

from __future__ import annotations

import random


class Backoff:
    """Binary exponential backoff with full jitter, capped.

    The n-th :meth:`next` (from 0) returns a delay drawn uniformly from
    ``[0, min(cap, base * factor**n)]`` ("full jitter"); :meth:`ceiling` is
    that upper bound. :meth:`reset` starts over (call it after a success).
    """

    def __init__(
        self,
        base: float = 0.5,
        cap: float = 60.0,
        factor: float = 2.0,
        *,
        rng: random.Random | None = None,
    ) -> None:
        if base <= 0 or cap <= 0:
            raise ValueError("base and cap must be positive")
        if factor < 1:
            raise ValueError("factor must be at least 1")
        self.base = float(base)
        self.cap = float(cap)
        self.factor = float(factor)
        self._rng = rng if rng is not None else random.Random()
        self.attempt = 0

    def ceiling(self, attempt: int | None = None) -> float:
        """The largest delay of an attempt (default: the next one)."""
        n = self.attempt if attempt is None else attempt
        # Compare in the exponent to avoid overflowing float for large n.
        bound = self.base
        for _ in range(n):
            bound *= self.factor
            if bound >= self.cap:
                return self.cap
        return min(self.cap, bound)

    def next(self) -> float:
        """The delay before the next try (seconds); each call doubles the ceiling, up to the cap."""
        delay = self._rng.uniform(0.0, self.ceiling())
        self.attempt += 1
        return delay

    def reset(self) -> None:
        self.attempt = 0
