"""The invariant checker must catch what it claims to catch (synthetic histories)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from invariants import (
    check_attempts,
    check_event_paths,
    check_job,
    check_outputs,
)

from herder.api_models import EventView, JobView

NOW = datetime(2024, 1, 1, tzinfo=UTC)


def ev(
    i: int,
    kind: str,
    frm: str | None,
    to: str | None,
    attempt: int | None = None,
    task: int | None = 1,
) -> EventView:
    return EventView(
        id=i,
        at=NOW,
        job_id=1,
        task_id=task,
        attempt_id=attempt,
        agent_id="a" if attempt else None,
        kind=kind,
        from_state=frm,
        to_state=to,
        reason=None,
    )


def good_history() -> list[EventView]:
    """Offered to attempt 10, lease expired, offered to 11, acked, succeeded."""
    return [
        ev(1, "job.submit", None, "queued", task=None),
        ev(2, "task.offer", "queued", "offered", 10),
        ev(3, "job.start", "queued", "running", task=None),
        ev(4, "task.ack", "offered", "running", 10),
        ev(5, "task.lease_expired", "running", "queued", 10),
        ev(6, "task.offer", "queued", "offered", 11),
        ev(7, "task.ack", "offered", "running", 11),
        ev(8, "task.succeed", "running", "succeeded", 11),
        ev(9, "job.succeed", "running", "succeeded", task=None),
    ]


def attempt(
    aid: int, number: int, state: str, outputs: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    return {
        "id": aid,
        "href": f"/a/{aid}",
        "number": number,
        "agent_id": "a",
        "state": state,
        "log_href": "/l",
        "outputs": outputs or [],
    }


def job(task_state: str, attempts: list[dict[str, Any]], job_state: str = "succeeded") -> JobView:
    return JobView.model_validate(
        {
            "id": 1,
            "href": "/j/1",
            "name": "j",
            "owner": None,
            "pool": "default",
            "priority": 0,
            "state": job_state,
            "created_at": NOW,
            "updated_at": NOW,
            "stages": [
                {
                    "index": 0,
                    "name": "s",
                    "state": task_state,
                    "counts": {},
                    "tasks": [
                        {
                            "id": 1,
                            "href": "/t/1",
                            "job_id": 1,
                            "stage": 0,
                            "name": "t",
                            "state": task_state,
                            "command": "true",
                            "placement": "remote",
                            "max_attempts": 1,
                            "cpus": 1,
                            "ram_mb": 0,
                            "attempts": attempts,
                        }
                    ],
                }
            ],
        }
    )


def test_a_legal_history_passes() -> None:
    j = job("succeeded", [attempt(10, 1, "lost"), attempt(11, 2, "succeeded")])
    s = check_job(j, good_history())
    assert s.violations == []
    assert s.requeues["task.lease_expired"] == 1


def test_double_success_is_caught() -> None:
    events = [
        *good_history()[:8],
        # A stale completion that was (wrongly) accepted after the first success.
        ev(20, "task.succeed", "running", "succeeded", 11),
    ]
    v = check_event_paths(events, {1: "queued"})
    assert any("second time" in x for x in v), v


def test_success_from_a_non_current_attempt_is_caught() -> None:
    events = [*good_history()[:7], ev(8, "task.succeed", "running", "succeeded", 10)]
    v = check_event_paths(events, {1: "queued"}, {1: "succeeded"})
    assert any("non-current attempt" in x for x in v), v


def test_illegal_transitions_are_caught() -> None:
    # queued → running without an offer; and a broken chain (from ≠ previous to).
    v = check_event_paths([ev(1, "task.ack", "queued", "running", 10)], {1: "queued"})
    assert any("illegal transition" in x for x in v), v
    v = check_event_paths(
        [
            ev(1, "task.offer", "queued", "offered", 10),
            ev(2, "task.succeed", "running", "succeeded", 10),
        ],
        {1: "queued"},
    )
    assert any("previous state" in x for x in v), v
    # A blocked task cannot be offered.
    v = check_event_paths([ev(1, "task.offer", "blocked", "offered", 10)], {1: "blocked"})
    assert v
    # A path that does not end where the task is.
    v = check_event_paths(good_history()[:5], {1: "queued"}, {1: "succeeded"})
    assert any("events end in" in x for x in v), v
    # An unknown event kind.
    v = check_event_paths([ev(1, "task.teleport", "queued", "succeeded", 10)], {1: "queued"})
    assert any("unknown task event" in x for x in v), v


def test_attempt_invariants_are_caught() -> None:
    two = job("succeeded", [attempt(10, 1, "succeeded"), attempt(11, 2, "succeeded")])
    assert any("2 succeeded attempts" in x for x in check_attempts(two))
    none = job("succeeded", [attempt(10, 1, "lost")])
    assert any("0 succeeded attempts" in x for x in check_attempts(none))
    not_last = job("succeeded", [attempt(10, 1, "succeeded"), attempt(11, 2, "lost")])
    assert any("not the last attempt" in x for x in check_attempts(not_last))
    active = job("succeeded", [attempt(10, 1, "running"), attempt(11, 2, "succeeded")])
    assert any("still active" in x for x in check_attempts(active))
    gap = job("succeeded", [attempt(10, 1, "lost"), attempt(11, 3, "succeeded")])
    assert any("not 1..n" in x for x in check_attempts(gap))
    failed = job("failed", [attempt(10, 1, "succeeded")], job_state="failed")
    assert any("has succeeded attempts" in x for x in check_attempts(failed))
    # The succeed event must name the succeeded attempt.
    j = job("succeeded", [attempt(10, 1, "lost"), attempt(11, 2, "succeeded")])
    wrong = [*good_history()[:7], ev(8, "task.succeed", "running", "succeeded", 12)]
    assert any("task.succeed events name" in x for x in check_attempts(j, wrong))


def test_job_level_checks() -> None:
    j = job("succeeded", [attempt(10, 1, "lost"), attempt(11, 2, "succeeded")])
    twice = [*good_history(), ev(10, "job.succeed", "running", "succeeded", task=None)]
    assert any("entered succeeded 2 times" in x for x in check_job(j, twice).violations)
    stuck = job("running", [attempt(10, 1, "running")], job_state="running")
    v = check_job(stuck, good_history()[:4]).violations
    assert any("want succeeded" in x for x in v), v


def test_output_checks() -> None:
    import hashlib

    data = b"right\n"
    d = hashlib.sha256(data).hexdigest()
    out = [{"path": "out/1.txt", "digest": d, "size": len(data)}]
    j = job("succeeded", [attempt(11, 1, "succeeded", out)])
    blobs = {d: data}
    assert check_outputs(j, {1: {"out/1.txt": data}}, blobs.__getitem__) == []
    assert check_outputs(j, {1: {"out/1.txt": b"wrong\n"}}, blobs.__getitem__)
    assert check_outputs(j, {1: {"out/2.txt": data}}, blobs.__getitem__)
    # The store lies about the bytes, or lost the blob.
    assert check_outputs(j, {1: {"out/1.txt": data}}, {d: b"other\n"}.__getitem__)
    no_blobs: dict[str, bytes] = {}
    assert check_outputs(j, {1: {"out/1.txt": data}}, no_blobs.__getitem__)
