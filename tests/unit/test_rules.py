"""The delivery rules of herder.core.rules (no database): retry budgets, retry
elsewhere first, blocklist, heartbeat reconciliation, maintenance lock."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from herder.core.rules import (
    DEFAULT_BLOCKLIST_FORGIVE_S,
    DEFAULT_BLOCKLIST_THRESHOLD,
    DEFAULT_INFRA_BUDGET,
    Assigned,
    AttemptPhase,
    BlocklistEntry,
    BlocklistPolicy,
    FailureKind,
    PlacementPolicy,
    RetryPolicy,
    blocklist_strike,
    is_blocklisted,
    may_offer_after_failure,
    may_take_lock,
    reconcile,
    retry_decision,
)
from herder.core.states import TASK_SOURCES, TaskEvent, TaskState, task_target

NOW = datetime(2025, 1, 1, 12, 0, 0, tzinfo=UTC)
K = FailureKind


def s(seconds: float) -> timedelta:
    return timedelta(seconds=seconds)


# ------------------------------------------------------------ retry budgets


def test_defaults() -> None:
    assert DEFAULT_INFRA_BUDGET == 5
    assert DEFAULT_BLOCKLIST_THRESHOLD == 3
    assert DEFAULT_BLOCKLIST_FORGIVE_S == 600.0
    assert RetryPolicy().infra_budget == 5
    with pytest.raises(ValueError):
        RetryPolicy(infra_budget=0)
    with pytest.raises(ValueError):
        BlocklistPolicy(threshold=0)


def test_command_failures_count_against_max_attempts_only() -> None:
    d = retry_decision(K.COMMAND, failures=0, infra_failures=3, max_attempts=3)
    assert (d.retry, d.event, d.failures, d.infra_failures) == (True, TaskEvent.FAIL_RETRY, 1, 3)
    assert d.avoid_agent and d.blocklist_strike
    d = retry_decision(K.COMMAND, failures=2, infra_failures=0, max_attempts=3)
    assert (d.retry, d.event, d.failures) == (False, TaskEvent.FAIL, 3)
    d = retry_decision(K.COMMAND, failures=0, infra_failures=0, max_attempts=1)
    assert not d.retry and d.event is TaskEvent.FAIL


@pytest.mark.parametrize("kind", [K.LOST, K.LAUNCH])
def test_infra_failures_have_their_own_budget(kind: FailureKind) -> None:
    policy = RetryPolicy(infra_budget=5)
    # max_attempts=1 and a command failure already spent: infra failures still retry.
    for before in range(4):
        d = retry_decision(kind, failures=0, infra_failures=before, max_attempts=1, policy=policy)
        assert d.retry and d.infra_failures == before + 1 and d.failures == 0
        assert d.avoid_agent
    d = retry_decision(kind, failures=0, infra_failures=4, max_attempts=1, policy=policy)
    assert not d.retry and d.infra_failures == 5
    if kind is K.LOST:
        assert d.event is TaskEvent.LEASE_EXHAUSTED
        assert retry_decision(kind, failures=0, infra_failures=0, max_attempts=1).event is (
            TaskEvent.LEASE_EXPIRED
        )
        assert not d.blocklist_strike  # a killed agent is not at fault for the command
    else:
        assert d.event is TaskEvent.FAIL
        assert d.blocklist_strike


@pytest.mark.parametrize("kind", [K.RELEASED, K.UNACKED])
def test_released_and_unacked_count_against_neither(kind: FailureKind) -> None:
    d = retry_decision(kind, failures=7, infra_failures=4, max_attempts=1, policy=RetryPolicy(5))
    assert d.retry and (d.failures, d.infra_failures) == (7, 4)
    assert not d.avoid_agent and not d.blocklist_strike
    assert d.event is (TaskEvent.RELEASE if kind is K.RELEASED else TaskEvent.OFFER_EXPIRED)


@pytest.mark.parametrize("kind", list(FailureKind))
@pytest.mark.parametrize("failures", [0, 1, 4])
@pytest.mark.parametrize("infra", [0, 1, 4])
def test_decisions_are_legal_transitions(kind: FailureKind, failures: int, infra: int) -> None:
    """Every decision's event leaves an active state and lands where ``retry`` says."""
    d = retry_decision(kind, failures=failures, infra_failures=infra, max_attempts=3)
    assert set(TASK_SOURCES[d.event]) & {TaskState.OFFERED, TaskState.RUNNING}
    assert task_target(d.event) is (TaskState.QUEUED if d.retry else TaskState.FAILED)
    assert d.failures >= failures and d.infra_failures >= infra
    assert (d.failures - failures) + (d.infra_failures - infra) <= 1


# ----------------------------------------------------- retry elsewhere first


def test_retry_elsewhere_first() -> None:
    p = PlacementPolicy(retry_elsewhere_s=10)
    # never failed, or failed on another agent: fine
    assert may_offer_after_failure("a", None, waited_s=0, other_agent_live=True, policy=p)
    assert may_offer_after_failure("a", "b", waited_s=0, other_agent_live=True, policy=p)
    # just failed here, another agent is live: not yet
    assert not may_offer_after_failure("a", "a", waited_s=0, other_agent_live=True, policy=p)
    assert not may_offer_after_failure("a", "a", waited_s=9.9, other_agent_live=True, policy=p)
    # waited long enough: back to this agent rather than starve
    assert may_offer_after_failure("a", "a", waited_s=10, other_agent_live=True, policy=p)
    # the only live agent: at once
    assert may_offer_after_failure("a", "a", waited_s=0, other_agent_live=False, policy=p)


# ----------------------------------------------------------------- blocklist


def test_blocklist_after_threshold_then_forgiven() -> None:
    p = BlocklistPolicy(threshold=3, forgive_s=600)
    e: BlocklistEntry | None = None
    blocks = []
    for i in range(3):
        st = blocklist_strike(e, NOW + s(i), p)
        e = st.entry
        blocks.append(st.newly_blocked)
    assert blocks == [False, False, True]
    assert e is not None and e.failures == 3 and e.blocked_until == NOW + s(2) + s(600)
    assert is_blocklisted(e, NOW + s(3))
    assert is_blocklisted(e, NOW + s(601))
    assert not is_blocklisted(e, NOW + s(602))  # forgiven (the bound is exclusive)
    assert not is_blocklisted(None, NOW)
    # a failure while blocked keeps the block, does not re-announce it
    st = blocklist_strike(e, NOW + s(10), p)
    assert not st.newly_blocked and st.entry.blocked_until == e.blocked_until
    assert st.entry.failures == 4
    # after forgiveness the count starts again
    st = blocklist_strike(e, NOW + s(700), p)
    assert (st.entry.failures, st.entry.blocked_until, st.newly_blocked) == (1, None, False)


def test_blocklist_old_strikes_are_forgotten() -> None:
    p = BlocklistPolicy(threshold=3, forgive_s=60)
    e = BlocklistEntry(failures=2, last_failure_at=NOW - s(61))
    st = blocklist_strike(e, NOW, p)
    assert st.entry.failures == 1 and not st.newly_blocked
    e = BlocklistEntry(failures=2, last_failure_at=NOW - s(59))
    st = blocklist_strike(e, NOW, p)
    assert st.entry.failures == 3 and st.newly_blocked


def test_blocklist_threshold_one() -> None:
    st = blocklist_strike(None, NOW, BlocklistPolicy(threshold=1, forgive_s=5))
    assert st.newly_blocked and st.entry.blocked_until == NOW + s(5)


# ------------------------------------------------------------ reconciliation


def running(aid: int, started: datetime, token: str | None = None) -> Assigned:
    return Assigned(aid, token or f"t{aid}", AttemptPhase.RUNNING, started)


def offered(aid: int, token: str | None = None) -> Assigned:
    return Assigned(aid, token or f"t{aid}", AttemptPhase.OFFERED, None)


def test_reconcile_both_ways() -> None:
    assigned = [
        running(1, NOW - s(60)),  # listed: renew
        running(2, NOW - s(60)),  # not listed, past grace: requeue
        running(3, NOW - s(1)),  # not listed, within grace (ack raced the heartbeat): keep
        offered(4),  # listed while offered: renew and ack
        offered(5),  # not listed, offered: left to the ack deadline
    ]
    reported = {1: "t1", 4: "t4", 9: "t9", 6: "wrong"}
    r = reconcile(assigned, reported, NOW, grace_s=5)
    assert r.renew == (1, 4)
    assert r.ack == (4,)
    assert r.requeue == (2,)
    assert r.cancel == (6, 9)  # 9: not assigned; 6: unknown


def test_reconcile_wrong_token_is_cancelled_not_renewed() -> None:
    r = reconcile([running(1, NOW - s(60))], {1: "forged"}, NOW, grace_s=5)
    # the real attempt 1 is not listed (its token is not the agent's): lost; the forged one: kill
    assert (r.renew, r.cancel, r.requeue) == ((), (1,), (1,))


def test_reconcile_empty() -> None:
    r = reconcile([], {}, NOW)
    assert (r.renew, r.ack, r.requeue, r.cancel) == ((), (), (), ())
    r = reconcile([running(1, NOW - s(60))], {}, NOW, grace_s=5)
    assert r.requeue == (1,)


def test_reconcile_partitions_the_reported_set() -> None:
    assigned = [running(i, NOW - s(100)) for i in range(10)]
    reported = {i: f"t{i}" for i in range(5, 15)}
    r = reconcile(assigned, reported, NOW, grace_s=5)
    assert set(r.renew) | set(r.cancel) == set(reported)
    assert not set(r.renew) & set(r.cancel)
    assert set(r.requeue) == set(range(5))
    assert not set(r.requeue) & set(r.renew)


# --------------------------------------------------------------- maintenance


def test_maintenance_lock_rule() -> None:
    assert may_take_lock(None, None, "m1", NOW)  # no row yet
    assert may_take_lock("m1", NOW + s(5), "m1", NOW)  # mine: renew
    assert not may_take_lock("m2", NOW + s(5), "m1", NOW)  # another's, live
    assert not may_take_lock("m2", NOW, "m1", NOW)  # expiry is exclusive
    assert may_take_lock("m2", NOW - s(0.001), "m1", NOW)  # expired: take over
