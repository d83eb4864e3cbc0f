"""Delivery rules of the farm (DESIGN §5, issue 4) as pure functions, no database.

The store applies exactly these rules; where it embeds a rule in SQL (the
claim's placement filters), the SQL is a transcription of the function here
and uses the same policy values. Unit tests (``tests/unit/test_rules.py``)
test the functions; integration tests check that the store behaves the same.

Rules:

- **Retry budgets.** A failure of the command itself (non-zero exit, timeout)
  counts against the task's ``max_attempts``. An infrastructure failure
  (agent lost, lease expired, launch failed) counts against a separate,
  larger budget (``RetryPolicy.infra_budget``, default 5). A task the agent
  hands back (``released``, e.g. on shutdown) and an offer never acknowledged
  (the command never started) count against neither.
- **Retry elsewhere first.** A task that failed on an agent (command failure,
  launch failure, or lease lost on it) is not offered to that agent again
  while another agent may take it. The same agent gets it anyway when
  (a) the task has waited ``PlacementPolicy.retry_elsewhere_s`` (default 10 s)
  since it was requeued, so a busy or unsuitable rest of the farm cannot
  starve it, or (b) no other agent is live (online, not draining, seen within
  the offline threshold), so a one-agent farm keeps working.
- **Blocklist.** An agent that fails a job's tasks ``BlocklistPolicy.threshold``
  times (default 3; command and launch failures only: an agent that is
  killed is not at fault for the commands it ran) is blocklisted for that job
  for ``BlocklistPolicy.forgive_s`` (default 600 s); then it is forgiven and
  its count starts again. Strikes older than ``forgive_s`` are forgotten too.
  Like the rule above, the blocklist does not apply while no other agent is
  live: blocking the only agent would only stall the job.
- **Heartbeat reconciliation** (both ways): an attempt the database assigns
  to the agent, acknowledged more than ``grace_s`` ago, but missing from its
  heartbeat (with its token) is requeued as an infrastructure failure (the
  agent lost it); an attempt the agent lists that the database does not
  assign to it (or with the wrong token) is returned to be killed on the agent. Offers not yet
  acknowledged are left to the ack deadline.
- **Memory-aware retry** (issue 13, as OpenCue does): an attempt killed for
  exceeding its task's ``ram_mb`` (the agent's RSS watch) or by the kernel's
  OOM killer (``FailureKind.MEMORY``) requeues the task with ``ram_mb``
  multiplied by ``RamRetryPolicy.factor`` (default 1.5; a task with no limit
  starts from the peak RSS the agent saw), rounded up, at most the
  ceiling: ``RamRetryPolicy.ceiling_mb`` (default 64 GiB), lowered to the
  largest RAM any registered agent reports, so a raised task still fits some
  machine. Memory failures have **their own budget**, not ``max_attempts``:
  the command did nothing wrong but ask for too little, and the growth is
  bounded by the ceiling and by ``RamRetryPolicy.max_raises`` (default 10).
  A task already at the ceiling, out of raises, or whose need is unknown (no
  limit and no peak seen) fails for good with the reason. Memory failures
  neither avoid the agent nor strike it for the blocklist: the agent is not
  at fault.
- **Master directory** (seeds/000, seeds/001): every master heartbeats its
  row every ``DEFAULT_MASTER_HEARTBEAT_S``; the directory lists a master only
  while it is up: not stopped, heartbeat younger than its timeout (3
  intervals by default), and no failure reported at or after that heartbeat
  (``master_visible``). A failed master reappears with its next heartbeat.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from herder.core.states import TaskEvent, completion_event, lease_event

DEFAULT_INFRA_BUDGET = 5
DEFAULT_RETRY_ELSEWHERE_S = 10.0
DEFAULT_BLOCKLIST_THRESHOLD = 3
DEFAULT_BLOCKLIST_FORGIVE_S = 600.0
DEFAULT_HEARTBEAT_GRACE_S = 5.0


class FailureKind(StrEnum):
    """Why an attempt ended without success."""

    COMMAND = "command"  # the command exited non-zero or timed out
    LAUNCH = "launch_failed"  # the agent could not start it (infrastructure)
    LOST = "lost"  # lease expired, or the agent's heartbeat no longer lists it (infrastructure)
    RELEASED = "released"  # the agent handed it back (shutdown, drain): no budget
    UNACKED = "unacked"  # the offer was never acknowledged: the command never started
    MEMORY = "memory"  # killed for exceeding its RAM (the agent's watch, or the kernel's OOM kill)


INFRA_KINDS: frozenset[FailureKind] = frozenset({FailureKind.LAUNCH, FailureKind.LOST})


@dataclass(frozen=True)
class RetryPolicy:
    infra_budget: int = DEFAULT_INFRA_BUDGET

    def __post_init__(self) -> None:
        if self.infra_budget < 1:
            raise ValueError("infra_budget must be at least 1")


@dataclass(frozen=True)
class RetryDecision:
    """What a failed attempt does to its task."""

    event: TaskEvent
    retry: bool  # back to the queue (False: the task fails for good)
    failures: int  # the task's command-failure count after this attempt
    infra_failures: int  # the task's infrastructure-failure count after this attempt
    avoid_agent: bool  # retry elsewhere first (sets tasks.last_failed_agent_id)
    blocklist_strike: bool  # counts towards blocklisting the agent for the job


def retry_decision(
    kind: FailureKind,
    *,
    failures: int,
    infra_failures: int,
    max_attempts: int,
    policy: RetryPolicy = RetryPolicy(),
) -> RetryDecision:
    """Decide retry or fail, and update the two budgets, for one failed attempt.

    ``failures`` and ``infra_failures`` are the task's counts before this attempt.
    """
    if kind is FailureKind.COMMAND:
        after = failures + 1
        event = completion_event(False, after, max_attempts)
        return RetryDecision(
            event=event,
            retry=event is TaskEvent.FAIL_RETRY,
            failures=after,
            infra_failures=infra_failures,
            avoid_agent=True,
            blocklist_strike=True,
        )
    if kind in INFRA_KINDS:
        after = infra_failures + 1
        retry = after < policy.infra_budget
        if kind is FailureKind.LOST:
            event = lease_event(after, policy.infra_budget)
        else:
            event = TaskEvent.RELEASE if retry else TaskEvent.FAIL
        return RetryDecision(
            event=event,
            retry=retry,
            failures=failures,
            infra_failures=after,
            avoid_agent=True,
            blocklist_strike=kind is FailureKind.LAUNCH,
        )
    event = TaskEvent.RELEASE if kind is FailureKind.RELEASED else TaskEvent.OFFER_EXPIRED
    return RetryDecision(
        event=event,
        retry=True,
        failures=failures,
        infra_failures=infra_failures,
        avoid_agent=False,
        blocklist_strike=False,
    )


# ----------------------------------------------------------- memory retry

DEFAULT_RAM_RETRY_FACTOR = 1.5
DEFAULT_RAM_RETRY_CEILING_MB = 64 * 1024
DEFAULT_RAM_RETRY_MAX_RAISES = 10


@dataclass(frozen=True)
class RamRetryPolicy:
    """How a task that ran out of memory is retried (``ram_retry_decision``)."""

    factor: float = DEFAULT_RAM_RETRY_FACTOR
    ceiling_mb: int = DEFAULT_RAM_RETRY_CEILING_MB
    max_raises: int = DEFAULT_RAM_RETRY_MAX_RAISES

    def __post_init__(self) -> None:
        # Below 1.1 a task would creep up in tiny steps, one killed attempt each.
        if not 1.1 <= self.factor <= 10:
            raise ValueError(f"RAM retry factor must be between 1.1 and 10, not {self.factor:g}")
        if self.ceiling_mb < 1:
            raise ValueError("RAM retry ceiling must be at least 1 MB")
        if self.max_raises < 0:
            raise ValueError("RAM retry max_raises must not be negative")


@dataclass(frozen=True)
class RamRetry:
    """What a memory failure does to its task."""

    retry: bool  # requeued with ``ram_mb`` (False: the task fails for good)
    ram_mb: int  # the task's ram_mb from now on (unchanged when it fails)
    memory_failures: int  # the task's memory-failure count after this attempt
    reason: str  # for the event and the task's error


def ram_retry_decision(
    ram_mb: int,
    peak_mb: int | None,
    *,
    memory_failures: int,
    largest_agent_mb: int | None = None,
    policy: RamRetryPolicy = RamRetryPolicy(),
) -> RamRetry:
    """Raise the task's RAM after a memory failure, or fail it (the rule in the module doc).

    ``ram_mb`` is the task's limit (0: none), ``peak_mb`` the highest RSS the
    agent saw (None: not sampled), ``largest_agent_mb`` the most RAM a
    registered agent reports (None or 0: unknown, the ceiling alone applies).
    """
    ceiling = policy.ceiling_mb
    if largest_agent_mb:
        ceiling = min(ceiling, largest_agent_mb)
    what = f"exceeded {ram_mb} MB" if ram_mb > 0 else "ran out of memory"
    if peak_mb is not None:
        what += f" (peak {peak_mb} MB)"
    after = memory_failures + 1

    def fail(why: str) -> RamRetry:
        return RamRetry(False, ram_mb, after, f"{what}: {why}")

    # The limit, not the peak: the watch kills at the first sample past the limit,
    # so the peak says when it was caught, not what the task needs.
    basis = ram_mb if ram_mb > 0 else (peak_mb or 0)
    if basis <= 0:
        return fail("no RAM limit and no peak known, so no larger limit to retry with")
    if ram_mb >= ceiling:
        return fail(f"already at the RAM retry ceiling of {ceiling} MB, not retrying")
    if memory_failures >= policy.max_raises:
        return fail(f"RAM raised {memory_failures} times already, not retrying")
    # Whole megabytes, rounded up: 100 MB x 1.5 is 150 MB, 101 MB x 1.5 is 152 MB.
    raised = min(-(-int(basis * policy.factor * 1000) // 1000), ceiling)
    raised = max(raised, ram_mb + 1)
    return RamRetry(True, raised, after, f"{what}: retrying with {raised} MB")


# ----------------------------------------------------------------- placement


@dataclass(frozen=True)
class PlacementPolicy:
    retry_elsewhere_s: float = DEFAULT_RETRY_ELSEWHERE_S


def may_offer_after_failure(
    agent_id: str,
    last_failed_agent_id: str | None,
    *,
    waited_s: float,
    other_agent_live: bool,
    policy: PlacementPolicy = PlacementPolicy(),
) -> bool:
    """May this task (requeued ``waited_s`` ago) be offered to ``agent_id``?

    The claim statement embeds this rule (``Store`` builds it from the same
    policy): ``last_failed_agent_id IS NULL OR last_failed_agent_id <> :agent
    OR updated_at <= :now - retry_elsewhere_s OR NOT EXISTS (other live agent)``.
    """
    if last_failed_agent_id is None or last_failed_agent_id != agent_id:
        return True
    if waited_s >= policy.retry_elsewhere_s:
        return True
    return not other_agent_live


# ----------------------------------------------------------------- blocklist


@dataclass(frozen=True)
class BlocklistPolicy:
    threshold: int = DEFAULT_BLOCKLIST_THRESHOLD
    forgive_s: float = DEFAULT_BLOCKLIST_FORGIVE_S

    def __post_init__(self) -> None:
        if self.threshold < 1:
            raise ValueError("blocklist threshold must be at least 1")
        if self.forgive_s < 0:
            raise ValueError("blocklist forgive time must not be negative")


@dataclass(frozen=True)
class BlocklistEntry:
    """One (agent, job) row: strikes so far, when the last one was, and the block if any."""

    failures: int = 0
    last_failure_at: datetime | None = None
    blocked_until: datetime | None = None


@dataclass(frozen=True)
class Strike:
    entry: BlocklistEntry
    newly_blocked: bool


def is_blocklisted(entry: BlocklistEntry | None, now: datetime) -> bool:
    """Blocked until ``blocked_until`` (exclusive): the claim tests ``blocked_until > :now``."""
    return entry is not None and entry.blocked_until is not None and now < entry.blocked_until


def blocklist_strike(
    entry: BlocklistEntry | None, now: datetime, policy: BlocklistPolicy = BlocklistPolicy()
) -> Strike:
    """Record one failure of a job's task on an agent; block at the threshold.

    A forgiven block (``blocked_until`` passed) and strikes older than
    ``forgive_s`` are forgotten: the count starts again at this one.
    """
    entry = entry or BlocklistEntry()
    window = timedelta(seconds=policy.forgive_s)
    if is_blocklisted(entry, now):
        # Already blocked (a task it was running when blocked failed too): keep the block.
        return Strike(
            BlocklistEntry(entry.failures + 1, now, entry.blocked_until), newly_blocked=False
        )
    forgiven = entry.blocked_until is not None  # a block that has run out
    stale = entry.last_failure_at is None or entry.last_failure_at <= now - window
    failures = 1 if forgiven or stale else entry.failures + 1
    if failures >= policy.threshold:
        return Strike(BlocklistEntry(failures, now, now + window), newly_blocked=True)
    return Strike(BlocklistEntry(failures, now, None), newly_blocked=False)


# ------------------------------------------------------------ reconciliation


class AttemptPhase(StrEnum):
    OFFERED = "offered"
    RUNNING = "running"


@dataclass(frozen=True)
class Assigned:
    """An attempt the database assigns to the agent (current, offered or running)."""

    attempt_id: int
    token: str
    phase: AttemptPhase
    started_at: datetime | None = None  # when acknowledged (running)


@dataclass(frozen=True)
class Reconciliation:
    renew: tuple[int, ...]  # listed and assigned: renew the lease
    ack: tuple[int, ...]  # of those, still offered: the heartbeat is their ack
    requeue: tuple[int, ...]  # assigned, running past the grace, not listed: lost
    cancel: tuple[int, ...]  # listed but not assigned to this agent: kill on the agent


def reconcile(
    assigned: Iterable[Assigned],
    reported: Mapping[int, str],
    now: datetime,
    grace_s: float = DEFAULT_HEARTBEAT_GRACE_S,
) -> Reconciliation:
    """Compare what the database assigns to an agent with what its heartbeat lists.

    ``reported`` maps attempt id → fencing token, as the agent sent them.
    """
    by_id = {a.attempt_id: a for a in assigned}
    grace_start = now - timedelta(seconds=grace_s)
    renew: list[int] = []
    ack: list[int] = []
    cancel: list[int] = []
    for attempt_id, token in reported.items():
        a = by_id.get(attempt_id)
        if a is None or not hmac.compare_digest(a.token.encode(), token.encode()):
            cancel.append(attempt_id)
            continue
        renew.append(attempt_id)
        if a.phase is AttemptPhase.OFFERED:
            ack.append(attempt_id)
    # Listed with the wrong token is not listed: the agent is not running *this* attempt.
    listed = set(renew)
    requeue = [
        a.attempt_id
        for a in by_id.values()
        if a.attempt_id not in listed
        and a.phase is AttemptPhase.RUNNING
        and a.started_at is not None
        and a.started_at < grace_start
    ]
    return Reconciliation(
        renew=tuple(sorted(renew)),
        ack=tuple(sorted(ack)),
        requeue=tuple(sorted(requeue)),
        cancel=tuple(sorted(cancel)),
    )


# --------------------------------------------------------------- maintenance


DEFAULT_MAINTENANCE_TTL_S = 10.0


def may_take_lock(holder: str | None, expires_at: datetime | None, me: str, now: datetime) -> bool:
    """The maintenance lock rule: free (no row), mine, or expired by the database clock.

    The store runs it as one conditional statement: ``UPDATE maintenance_lock
    SET holder = :me, expires_at = :now + ttl WHERE name = :name AND (holder =
    :me OR expires_at < :now)``, plus an insert-if-missing.
    """
    if holder is None or expires_at is None:
        return True
    return holder == me or expires_at < now


# ------------------------------------------------------- master directory

DEFAULT_MASTER_HEARTBEAT_S = 2.0
#: A master whose heartbeat is older than this many intervals is not listed as up.
MASTER_TIMEOUT_INTERVALS = 3.0


class MasterState(StrEnum):
    """A master's state in the directory (``GET /api/v1/masters``)."""

    UP = "up"
    FAILED = "failed"  # its heartbeat timed out, or a failure was reported since it
    STOPPED = "stopped"  # shut down gracefully


class MasterDown(StrEnum):
    """Why a master is not up."""

    STOPPED = "stopped"
    HEARTBEAT_TIMEOUT = "heartbeat_timeout"
    FAILURE_REPORTED = "failure_reported"


def master_timeout_s(interval_s: float, timeout_s: float | None = None) -> float:
    """The heartbeat timeout: ``timeout_s`` when given, else 3 heartbeat intervals."""
    return float(timeout_s) if timeout_s is not None else MASTER_TIMEOUT_INTERVALS * interval_s


def master_down_reason(
    state: str,
    last_heartbeat_at: datetime | None,
    last_failure_at: datetime | None,
    now: datetime,
    timeout_s: float,
) -> MasterDown | None:
    """Why a master is not listed as up; ``None`` if it is up. All times by the database clock.

    - A master that shut down gracefully (``state == "stopped"``) is down until
      it heartbeats again (a heartbeat sets the state back to ``up``).
    - A master whose last heartbeat is older than ``timeout_s`` is down.
    - A master with a failure reported at or after its last heartbeat is down
      "until it heartbeats again" (seeds/000): the next heartbeat, being later
      than the report, makes it visible again. A report received in the same
      clock tick as a heartbeat hides it (one interval at most: erring towards
      not sending work to a master someone could not reach).
    """
    if state == MasterState.STOPPED.value:
        return MasterDown.STOPPED
    if last_heartbeat_at is None or last_heartbeat_at < now - timedelta(seconds=timeout_s):
        return MasterDown.HEARTBEAT_TIMEOUT
    if last_failure_at is not None and last_failure_at >= last_heartbeat_at:
        return MasterDown.FAILURE_REPORTED
    return None


def master_state(
    state: str,
    last_heartbeat_at: datetime | None,
    last_failure_at: datetime | None,
    now: datetime,
    timeout_s: float,
) -> MasterState:
    """``up``, ``failed`` (heartbeat timed out or failure reported) or ``stopped``."""
    why = master_down_reason(state, last_heartbeat_at, last_failure_at, now, timeout_s)
    if why is None:
        return MasterState.UP
    return MasterState.STOPPED if why is MasterDown.STOPPED else MasterState.FAILED


def master_visible(
    state: str,
    last_heartbeat_at: datetime | None,
    last_failure_at: datetime | None,
    now: datetime,
    timeout_s: float,
) -> bool:
    """The directory lists a master iff it is up: heartbeat fresh, no failure since it, not stopped."""
    return master_down_reason(state, last_heartbeat_at, last_failure_at, now, timeout_s) is None
