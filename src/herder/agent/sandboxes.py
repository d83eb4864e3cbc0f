"""The executor's sandboxes on disk: recycled spares, and purging what a dead agent left.

A delivered sandbox whose ``work/`` stayed empty is renamed to ``.spare-N``
and taken by a later attempt without inputs (its logs truncated), instead of
being removed and made anew (DESIGN §10). Part of ``herder.agent.executor``'s
``Executor`` (a mixin: the state lives on the executor).
"""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Collection
from pathlib import Path
from typing import TYPE_CHECKING

from herder.agent.files import SandboxCleaner, rmtree_sandbox

if TYPE_CHECKING:
    from herder.agent.executor import Execution

SANDBOX_PREFIX = "a"
SPARE_PREFIX = ".spare-"  # a recycled sandbox waiting for its next attempt


class SandboxPool:
    """Spare sandboxes and stale ones, under the executor's ``work_root``."""

    work_root: Path
    _work_root_s: str
    _lock: threading.Lock
    _spares: list[str]
    _spare_seq: int
    max_spares: int
    cleaner: SandboxCleaner
    _running: dict[int, Execution]

    def _take_spare(self) -> str | None:
        with self._lock:
            return self._spares.pop() if self._spares else None

    def _recycle(self, ex: Execution) -> bool:
        """Keep ``ex``'s delivered sandbox for a later attempt; False: remove it instead.

        Only a sandbox whose ``work/`` is known empty (no inputs, no files left)
        and still ``rwxr-xr-x``, whose group is gone, and while the pool has room.
        """
        if not ex.work_empty or ex.result is None or ex.running:
            return False
        with self._lock:
            if len(self._spares) >= self.max_spares:
                return False
            self._spare_seq += 1
            spare = os.path.join(self._work_root_s, f"{SPARE_PREFIX}{self._spare_seq}")
        try:
            st = os.lstat(ex._work_s)
            if not stat.S_ISDIR(st.st_mode) or stat.S_IMODE(st.st_mode) != 0o755:
                return False
            os.rename(ex._sandbox_s, spare)
        except OSError:
            return False
        with self._lock:
            self._spares.append(spare)
        return True

    def drop_spares(self) -> None:
        """Remove the recycled sandboxes (the agent stops)."""
        with self._lock:
            spares, self._spares = self._spares, []
        for spare in spares:
            self.cleaner.put(Path(spare))

    def purge_stale(self, keep: Collection[int] = ()) -> int:
        """Remove sandboxes left by an earlier agent process, except ``keep``. Returns how many."""
        n = 0
        for entry in self.work_root.iterdir():
            name = entry.name
            if name.startswith(SPARE_PREFIX):
                with self._lock:
                    if str(entry) in self._spares:
                        continue
                rmtree_sandbox(entry)
                continue
            if name.startswith(SANDBOX_PREFIX) and name[1:].isdigit() and entry.is_dir():
                if int(name[1:]) in keep:
                    continue
                with self._lock:
                    if int(name[1:]) in self._running:
                        continue
                rmtree_sandbox(entry)
                n += 1
        return n


__all__ = ["SANDBOX_PREFIX", "SPARE_PREFIX", "SandboxPool"]
