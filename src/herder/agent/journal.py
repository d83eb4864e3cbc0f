"""The agent's journal: completions not yet acknowledged by a master (DESIGN §5).

One JSON file per completion, ``<state_dir>/journal/a<attempt_id>.json``,
written atomically (temporary file, fsync, rename, fsync of the directory).
An entry names the files holding its outputs' bytes (in the attempt's
sandbox, which the agent keeps until the entry is removed), so a restarted
agent can upload them and deliver the completion. Delivery stays fenced: the
completion carries its attempt's token, so a replay the master already
applied, or one for a task reassigned since, is answered ``stale`` and the
entry is dropped.

When the daemon writes an entry (see ``Agent._journal_if_needed``):

- before the first delivery attempt, when the attempt ran at least
  ``AgentConfig.journal_min_s`` (1 s by default): a ``kill -9`` between the
  process's end and the master's answer then loses nothing worth keeping.
  Shorter attempts skip it: re-running them (after the lease expires) costs
  less than the fsyncs would on every short task;
- as soon as a delivery fails (master unreachable, or the answer was lost);
- when the agent stops with completions still undelivered.

The entry is removed once a master answered the delivery (accepted or stale).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from herder.api_models import Completion

log = logging.getLogger("herder.agent")

PREFIX = "a"
SUFFIX = ".json"


@dataclass
class JournalEntry:
    completion: Completion
    blobs: dict[str, str] = field(default_factory=dict)  # digest -> file holding the bytes
    agent_id: str | None = None
    task_id: int | None = None

    @property
    def attempt_id(self) -> int:
        return self.completion.attempt_id

    def to_json(self) -> dict[str, Any]:
        return {
            "version": 1,
            "agent_id": self.agent_id,
            "task_id": self.task_id,
            "completion": self.completion.model_dump(mode="json"),
            "blobs": self.blobs,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> JournalEntry:
        blobs = data.get("blobs") or {}
        if not isinstance(blobs, dict):
            raise ValueError("blobs is not an object")
        return cls(
            completion=Completion.model_validate(data["completion"]),
            blobs={str(k): str(v) for k, v in blobs.items()},
            agent_id=data.get("agent_id"),
            task_id=data.get("task_id"),
        )


class Journal:
    """A directory of :class:`JournalEntry` files (thread-safe: one file per attempt)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._root_s = str(self.root)

    def path(self, attempt_id: int) -> str:
        return os.path.join(self._root_s, f"{PREFIX}{attempt_id}{SUFFIX}")

    def write(self, entry: JournalEntry) -> None:
        """Write ``entry`` durably (atomic replace; the file and the directory are fsync'd)."""
        final = self.path(entry.attempt_id)
        tmp = os.path.join(self._root_s, f".{PREFIX}{entry.attempt_id}.{os.getpid()}.tmp")
        data = json.dumps(entry.to_json(), separators=(",", ":")).encode()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, final)
        self._sync_dir()

    def remove(self, attempt_id: int) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path(attempt_id))

    def __contains__(self, attempt_id: int) -> bool:
        return os.path.exists(self.path(attempt_id))

    def load(self) -> list[JournalEntry]:
        """Every readable entry, oldest attempt first; unreadable files are set aside."""
        entries: list[JournalEntry] = []
        for name in sorted(os.listdir(self._root_s)):
            full = os.path.join(self._root_s, name)
            if name.startswith(".") and name.endswith(".tmp"):
                with contextlib.suppress(OSError):
                    os.unlink(full)  # a write that never completed
                continue
            if not (name.startswith(PREFIX) and name.endswith(SUFFIX)):
                continue
            try:
                with open(full, "rb") as fh:
                    entries.append(JournalEntry.from_json(json.loads(fh.read())))
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.error("event=journal_unreadable file=%s error=%r", full, str(exc))
                with contextlib.suppress(OSError):
                    os.replace(full, full + ".bad")
        entries.sort(key=lambda e: e.attempt_id)
        return entries

    def _sync_dir(self) -> None:
        with contextlib.suppress(OSError):
            fd = os.open(self._root_s, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
