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

An entry that cannot be read (corrupt JSON, a schema this agent does not
know, a completion no master would accept) or that a master refused even as
a minimal failure is *quarantined*: moved to ``<state_dir>/quarantine/``
(beside the journal) for an operator to look at, with one log line
``event=journal_quarantined attempt=… reason=…``. The agent goes on; the
master requeues the attempt when its lease runs out.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from herder.api_models import Completion

log = logging.getLogger("herder.agent")

PREFIX = "a"
SUFFIX = ".json"
QUARANTINE = "quarantine"  # beside the journal: entries set aside for good


def _log_quarantined(attempt: str, reason: str) -> None:
    # repr: the reason may quote a name with newlines or escapes; the line stays one line
    log.error(
        "event=journal_quarantined attempt=%s reason=%r",
        attempt if attempt.isdigit() else repr(attempt),
        reason.encode("utf-8", "backslashreplace").decode("utf-8"),
    )


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
    def from_json(cls, data: Any) -> JournalEntry:
        """ValueError (saying what is wrong) unless ``data`` is an entry this agent can deliver."""
        if not isinstance(data, dict):
            raise ValueError(f"not a journal entry (a JSON {type(data).__name__})")
        if data.get("version") != 1:
            raise ValueError(f"unknown journal entry version {data.get('version')!r}")
        blobs = data.get("blobs") or {}
        if not isinstance(blobs, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in blobs.items()
        ):
            raise ValueError("blobs is not an object of digest to file name")
        agent_id, task_id = data.get("agent_id"), data.get("task_id")
        if not isinstance(agent_id, str | None) or not isinstance(task_id, int | None):
            raise ValueError("agent_id or task_id has the wrong type")
        if "completion" not in data:
            raise ValueError("no completion")
        try:
            completion = Completion.model_validate(data["completion"])
        except ValidationError as exc:
            first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": str(exc)}
            where = ".".join(str(p) for p in first["loc"]) or "completion"
            raise ValueError(f"completion.{where}: {first['msg']}") from None
        return cls(completion=completion, blobs=dict(blobs), agent_id=agent_id, task_id=task_id)


class Journal:
    """A directory of :class:`JournalEntry` files (thread-safe: one file per attempt)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._root_s = str(self.root)
        self.quarantine_dir = self.root.parent / QUARANTINE

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
        """Every deliverable entry, oldest attempt first; the others are quarantined."""
        entries: list[JournalEntry] = []
        for name in sorted(os.listdir(self._root_s)):
            full = os.path.join(self._root_s, name)
            if name.startswith(".") and name.endswith(".tmp"):
                with contextlib.suppress(OSError):
                    os.unlink(full)  # a write that never completed
                continue
            if not (name.startswith(PREFIX) and name.endswith(SUFFIX)):
                continue
            stem = name[len(PREFIX) : -len(SUFFIX)]
            try:
                with open(full, "rb") as fh:
                    entry = JournalEntry.from_json(json.loads(fh.read()))
                if stem != str(entry.attempt_id):
                    raise ValueError(f"holds attempt {entry.attempt_id}, not {stem}")
            except OSError as exc:
                log.error("event=journal_unreadable file=%s error=%r", full, str(exc))
                continue  # maybe readable next time (permissions, I/O): leave it
            except (ValueError, RecursionError) as exc:  # JSON, schema, names
                self._quarantine_file(full, stem, f"unreadable: {exc}")
                continue
            entries.append(entry)
        entries.sort(key=lambda e: e.attempt_id)
        return entries

    def quarantine(self, attempt_id: int, reason: str, entry: JournalEntry | None = None) -> None:
        """Set ``attempt_id``'s entry aside for good (never replayed); ``entry``: write
        that there when the journal holds none. Failures are logged, never raised."""
        path = self.path(attempt_id)
        if os.path.exists(path):
            self._quarantine_file(path, str(attempt_id), reason)
            return
        try:
            self.quarantine_dir.mkdir(parents=True, exist_ok=True)
            if entry is not None:
                data = json.dumps(entry.to_json(), separators=(",", ":")).encode()
                dest = self.quarantine_dir / f"{PREFIX}{attempt_id}{SUFFIX}"
                dest.write_bytes(data)
        except (OSError, ValueError) as exc:
            log.error("event=quarantine_failed attempt=%d error=%r", attempt_id, str(exc))
        _log_quarantined(str(attempt_id), reason)

    def _quarantine_file(self, full: str, attempt: str, reason: str) -> None:
        name = os.path.basename(full)
        try:
            self.quarantine_dir.mkdir(parents=True, exist_ok=True)
            dest = self.quarantine_dir / name
            n = 1
            while dest.exists():  # an earlier quarantine of the same attempt: keep both
                dest = self.quarantine_dir / f"{name}.{n}"
                n += 1
            os.replace(full, dest)
            self._sync_dir()
        except OSError as exc:
            # Left in place: skipped (or refused and dropped again) on every start.
            log.error("event=quarantine_failed file=%s error=%r", full, str(exc))
        _log_quarantined(attempt, reason)

    def _sync_dir(self) -> None:
        with contextlib.suppress(OSError):
            fd = os.open(self._root_s, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
