"""Constants, result records and pure helpers shared by the store's modules."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from herder.api_models import (
    INLINE_TOTAL_MAX,
    Completion,
    CompletionResult,
    LogChunk,
    Offer,
    decode_inline,
    encode_inline,
)
from herder.core.states import (
    JobState,
    TaskState,
)
from herder.errors import DigestMismatch

_ACTIVE = (TaskState.OFFERED.value, TaskState.RUNNING.value)


_ACTIVE_ATTEMPT_SQL = "attempts.state IN ('offered', 'running')"  # matches the partial index


_CLAIMABLE_JOB_STATES = (JobState.QUEUED.value, JobState.RUNNING.value)


_BLOB_QUERY_BATCH = 500


_MAX_TX_RETRIES = 8


_LOOKUP: Any = object()  # sentinel: look the attempt up


REAPER_LOCK = "reaper"


@dataclass(frozen=True)
class WakeTarget:
    """An idle agent's talkback endpoint (``Store.wake_targets``)."""

    agent_id: str
    url: str
    token: str | None


@dataclass(frozen=True)
class SubmittedJob:
    """What ``Store.submit`` did: the job's id, whether it is new, its task ids in order."""

    id: int
    created: bool
    task_ids: list[int]


@dataclass
class ClaimOutcome:
    """What one claim transaction did (docs/architecture.md)."""

    offers: list[Offer] = field(default_factory=list)
    results: list[CompletionResult] = field(default_factory=list)
    woke: bool = False  # the transaction made tasks claimable (stage unblocked, retry)
    drain: bool = False  # an operator asked the agent to drain (POST /agents/{id}/drain)


@dataclass
class MasterStatus:
    """What a master writes into its directory row on each heartbeat."""

    id: str
    url: str
    role: str = "read-write"
    heartbeat_timeout_s: float = 6.0
    requests: int = 0
    unhandled_exceptions: int = 0
    avg_request_ms: float = 0.0
    in_flight: int = 0
    version: str | None = None


def _verified_inline(completions: Sequence[Completion]) -> dict[str, bytes]:
    """Inline output blobs of ``completions``, each checked against its digest."""
    found: dict[str, bytes] = {}
    for c in completions:
        if not c.blobs:
            continue
        for digest, data in decode_inline(c.blobs).items():
            _check_digest(digest, data, f"inline blob of attempt {c.attempt_id}: ")
            found[digest] = data
    return found


def _check_digest(digest: str, data: bytes, what: str = "") -> str:
    """The sha256 of ``data``; DigestMismatch (nothing stored) unless it is ``digest``."""
    actual = hashlib.sha256(data).hexdigest()
    if actual != digest.lower():
        raise DigestMismatch(
            f"{what}the data's sha256 does not match the digest",
            detail={"expected": digest, "actual": actual},
        )
    return actual


def _inline_for(requires: Sequence[Any], small: dict[str, bytes]) -> dict[str, str]:
    """Base64 of an offer's small required files, at most INLINE_TOTAL_MAX bytes in all."""
    out: dict[str, str] = {}
    total = 0
    for x in requires:
        data = small.get(x["digest"])
        if data is None or x["digest"] in out or total + len(data) > INLINE_TOTAL_MAX:
            continue
        out[x["digest"]] = encode_inline(data)
        total += len(data)
    return out


def _outcome_error(c: Completion, timeout_s: float | None) -> str | None:
    if c.error:
        return c.error
    if c.outcome == "exited":
        return None if c.exit_code == 0 else f"exit status {c.exit_code}"
    if c.outcome == "timeout":
        return f"timed out after {timeout_s:g}s" if timeout_s is not None else "timed out"
    if c.outcome == "launch_failed":
        return "launch failed"
    if c.outcome == "released":
        return "released by the agent"
    if c.outcome == "memory":
        return "ran out of memory"
    return "cancelled"


def _merge_chunks(chunks: Iterable[LogChunk]) -> dict[str, str]:
    out: dict[str, list[str]] = {}
    for ch in chunks:
        if ch.data:
            out.setdefault(ch.stream, []).append(ch.data)
    return {stream: "".join(parts) for stream, parts in out.items()}
