"""What every room of the agent shares: the client protocol, the attempt records,
the slot accounting state and its lock (``AgentCore``), and small helpers.

The agent (``herder.agent.daemon.Agent``) is ``AgentCore`` plus one mixin per
room: ``claims`` (poller, sender, reservations, claim-ahead window, wake),
``slots`` (slot threads: run one attempt, make its completion, outputs),
``heartbeat`` (leases, reconciliation, cancel, drain order, usage, acks and
log shipping) and ``delivery`` (outbox results, journal, settle and forget).
Every mutable field below is guarded by ``AgentCore._lock`` unless noted.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from herder.agent.config import AgentConfig
from herder.api_models import (
    AgentRegister,
    AgentView,
    ClaimRequest,
    ClaimResponse,
    Completion,
    CompletionResult,
    Heartbeat,
    HeartbeatResponse,
    LogChunk,
    Offer,
)

if TYPE_CHECKING:
    from herder.agent.execspec import ExecResult
    from herder.agent.executor import Execution, Executor
    from herder.agent.journal import Journal

ERROR_MAX = 10_000
LOG_BATCH = 1 << 20  # bytes of one stream per log request


class AgentClient(Protocol):
    """What the daemon needs of :class:`herder.client.HerderClient` (fakes in tests)."""

    def register_agent(self, req: AgentRegister) -> AgentView: ...
    def claim(self, agent_id: str, req: ClaimRequest) -> ClaimResponse: ...
    def ack(self, attempt_id: int, token: str) -> None: ...
    def append_log(self, attempt_id: int, token: str, chunks: list[LogChunk]) -> None: ...
    def heartbeat(self, agent_id: str, hb: Heartbeat) -> HeartbeatResponse: ...
    def missing_blobs(self, digests: list[str]) -> list[str]: ...
    def put_blob(self, digest: str, data: bytes) -> Any: ...
    def download_blob(self, digest: str, dest: Path) -> Any: ...
    def close(self) -> None: ...


def is_stale(exc: BaseException) -> bool:
    from herder.client import StaleAttemptError

    return isinstance(exc, StaleAttemptError)


def is_outcome_unknown(exc: BaseException) -> bool:
    from herder.client import RequestOutcomeUnknown

    return isinstance(exc, RequestOutcomeUnknown)


def is_client_error(exc: BaseException) -> bool:
    """An HTTP 4xx answer (other than 409 stale): resending will not help.

    Not 401/403: a token expired, revoked or not yet allowed is the farm's
    configuration, which an admin fixes; results are kept and sent again.
    """
    from herder.client import ApiError

    return (
        isinstance(exc, ApiError)
        and 400 <= exc.status < 500
        and exc.status not in (401, 403, 408, 429)
    )


REFUSED_STATUSES = (400, 413, 422)  # the master cannot take this request, ever


def is_refused(exc: BaseException) -> bool:
    """The completions of a request can never be delivered as they are.

    The master answered 400/413/422 (malformed, too large, invalid), or the
    request could not even be serialized (a string JSON cannot carry).
    """
    from pydantic import ValidationError
    from pydantic_core import PydanticSerializationError

    from herder.client import ApiError

    if isinstance(exc, ApiError):
        return exc.status in REFUSED_STATUSES
    return isinstance(exc, PydanticSerializationError | ValidationError | UnicodeError)


def printable(text: str) -> str:
    """``text`` with anything JSON cannot carry (lone surrogates) escaped."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


@dataclass
class Attempt:
    attempt_id: int
    token: str
    offer: Offer | None = None  # None for a completion loaded from the journal
    execution: Execution | None = None
    stale: bool = False  # the master no longer wants it: kill, never report
    unsent: list[LogChunk] = field(default_factory=list)  # log a failed append_log kept
    completion: Completion | None = None
    blobs: dict[str, Path] = field(default_factory=dict)  # output digest -> file with its bytes
    uploaded: bool = True  # False: the master may lack some of ``blobs``
    journaled: bool = False
    sandbox: Path | None = None  # to remove once delivered (journal entries)
    refused: str | None = None  # the master refused its real completion: this one is minimal

    @classmethod
    def of(cls, offer: Offer) -> Attempt:
        return cls(offer.attempt_id, offer.token, offer)

    @property
    def id(self) -> int:
        return self.attempt_id


@dataclass
class Reservation:
    """Slots held in ``Agent._reserved`` for ``claims`` requests in flight.

    Normally one claim holds one reservation. A talkback ``wake`` joins the
    parked long-poll's reservation instead of taking a second one: both
    requests may then return offers, and they share ``n`` first come, first
    served (plus slots free at that moment); offers beyond that are handed
    back at once (``released``). The last request to finish returns what is
    left of ``n``. So ``busy + reserved <= slots`` always holds.
    """

    n: int
    claims: int = 1


def merge_chunks(chunks: list[LogChunk]) -> list[LogChunk]:
    """Join consecutive chunks of the same stream."""
    out: list[LogChunk] = []
    for c in chunks:
        if out and out[-1].stream == c.stream:
            out[-1] = LogChunk(stream=c.stream, data=out[-1].data + c.data)
        elif c.data:
            out.append(c)
    return out


def clip(text: str) -> str:
    return text if len(text) <= ERROR_MAX else text[: ERROR_MAX - 20] + " … (truncated)"


class AgentCore:
    """The agent's shared state: one lock, three conditions on it, the slot counts.

    Slots are counted under ``_lock``: ``busy`` (offers handed to slots, or
    claimed ahead and waiting in ``_ready``, and not completed yet) plus
    ``reserved`` (slots asked for by claims in flight) never exceed
    ``slots + window`` (``herder.agent.claims``), and at most ``slots``
    commands run at once (one per slot thread).
    """

    config: AgentConfig
    client: AgentClient
    executor: Executor
    journal: Journal
    talkback: Any  # herder.agent.talkback.TalkbackServer while running
    _modal: Any  # herder.agent.autonomous.ModalClient when the agent built its client

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.agent_id: str | None = None
        self.lease_s = 30.0
        self._hb_now = threading.Event()  # heartbeat at once (the mode changed)
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)  # slot counts changed (poller, drain)
        self._send_cond = threading.Condition(self._lock)  # the outbox gained work
        self._slot_cond = threading.Condition(self._lock)  # an offer is ready for a slot
        self._busy = 0  # offers handed to slots (or waiting in _ready) and not completed yet
        self._reserved = 0  # slots asked for by claims in flight
        self._attempts: dict[int, Attempt] = {}
        self._acks: dict[int, float] = {}  # attempt id -> when it must be sent
        self._ready: deque[Offer] = deque()  # offers waiting for a slot thread
        self._running_use = (0, 0, 0)  # cpus, RAM (MB), GPUs of the offers the slots run
        self._outbox: list[Attempt] = []  # completions waiting to be delivered
        self._outbox_since = 0.0  # when the oldest outbox entry arrived
        self._started: dict[int, float] = {}  # running attempt -> when its slot took it
        self._sending = False  # the sender has a request in flight
        # Claim-ahead window (herder.agent.claims): recent run times, and the
        # window they open (0 until the agent has seen tasks, or when they are long).
        self._durations: deque[float] = deque(maxlen=max(1, config.claim_ahead_samples))
        self._ahead = 0
        self._rtt = 0.05  # moving average of a claim's round trip (the sender's), seconds
        self._stop = threading.Event()  # stop claiming (drain)
        self._halt = threading.Event()  # stop everything
        self._drain_until = math.inf  # monotonic deadline for running tasks once stopping
        self._signals_seen = 0
        self._threads: list[threading.Thread] = []
        self.stats: dict[str, int] = {
            "claims": 0,
            "completed": 0,
            "stale": 0,
            "acks_sent": 0,
            "journaled": 0,
        }
        # Talkback (herder.agent.talkback): the poller's parked long-poll, and
        # whether a wake asked the poller to cut its backoff short.
        self._parked: Reservation | None = None
        self._woken = False

    if TYPE_CHECKING:
        # Methods one room calls in another (defined by the mixins in daemon.Agent).

        def request_stop(self, timeout: float | None = None) -> None: ...
        def cancel_attempt(self, attempt_id: int, reason: str) -> None: ...
        def _drain_ordered(self) -> None: ...
        def _free(self) -> int: ...
        def _claim(
            self, n: int, wait_s: float, done: list[Attempt], res: Reservation | None = None
        ) -> list[Offer]: ...
        def _window(self) -> int: ...
        def _low_water(self) -> int: ...
        def _note_duration(self, seconds: float) -> None: ...
        def _trim_ready(self) -> None: ...
        def _release_ready(self, error: str) -> None: ...
        def _upload(self, att: Attempt) -> None: ...
        def _drop_outputs(self, att: Attempt, error: str) -> None: ...
        def _journal(self, att: Attempt) -> None: ...
        def _settle(self, done: list[Attempt], results: list[CompletionResult]) -> None: ...
        def _forget(self, att: Attempt) -> None: ...
        def _deliver_refused(
            self, done: list[Attempt], exc: BaseException
        ) -> BaseException | None: ...
        def _queue_released(self, offers: list[Offer], error: str = ...) -> None: ...
        def _run_one(self, offer: Offer) -> None: ...
        def _make_completion(self, att: Attempt, ex: Execution, res: ExecResult) -> Completion: ...
