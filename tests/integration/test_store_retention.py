"""Retention (issue 9): pruning finished jobs and collecting unreferenced blobs, on
SQLite and PostgreSQL, under the maintenance lock."""

from __future__ import annotations

import base64
import hashlib
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from herder.api_models import AgentRegister, LogChunk, OutputFile, RequiredFile, TaskSpec
from herder.errors import NotFound
from herder.store import Store
from herder.store.retention import RetentionPolicy
from herder.store.schema import attempts, blobs, events, jobs, log_chunks, stages, tasks
from storekit import job, make_store, ok

DAY = 86400.0


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    s = make_store(db_url)
    s.retention = RetentionPolicy()
    try:
        yield s
    finally:
        s.close()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def agent(store: Store) -> str:
    view, _ = store.register_agent(AgentRegister(name="a", hostname="h", slots=8))
    return view.id


def backdate_jobs(store: Store, ids: list[int], days: float) -> None:
    """finished_at in the past, through SQL (whatever the job's state)."""
    at = store.db_now() - timedelta(days=days)
    with store.engine.begin() as conn:
        conn.execute(sa.update(jobs).where(jobs.c.id.in_(ids)).values(finished_at=at))


def backdate_blobs(store: Store, digests: list[str], days: float) -> None:
    at = store.db_now() - timedelta(days=days)
    with store.engine.begin() as conn:
        conn.execute(sa.update(blobs).where(blobs.c.digest.in_(digests)).values(created_at=at))


def count(store: Store, table: sa.Table, where: Any) -> int:
    with store.engine.connect() as conn:
        return int(
            conn.execute(sa.select(sa.func.count()).select_from(table).where(where)).scalar_one()
        )


def rows_of_job(store: Store, job_id: int) -> dict[str, int]:
    task_ids = sa.select(tasks.c.id).where(tasks.c.job_id == job_id)
    attempt_ids = sa.select(attempts.c.id).where(attempts.c.task_id.in_(task_ids))
    return {
        "jobs": count(store, jobs, jobs.c.id == job_id),
        "stages": count(store, stages, stages.c.job_id == job_id),
        "tasks": count(store, tasks, tasks.c.job_id == job_id),
        "attempts": count(store, attempts, attempts.c.task_id.in_(task_ids)),
        "logs": count(store, log_chunks, log_chunks.c.attempt_id.in_(attempt_ids)),
        "events": count(store, events, events.c.job_id == job_id),
    }


def run_one(store: Store, agent_id: str, requires: list[RequiredFile], output: bytes) -> int:
    """A finished (succeeded) job with one task: an input, a log, an inline output blob."""
    sub = store.submit(job([TaskSpec(command="cat in > out", requires=requires)]))
    (offer,) = store.claim(agent_id, 1).offers
    store.ack(offer.attempt_id, offer.token)
    store.append_log(offer.attempt_id, offer.token, [LogChunk(stream="stdout", data="hello\n")])
    out = OutputFile(path="out", digest=sha(output), size=len(output))
    done = ok(offer, outputs=[out], blobs={sha(output): base64.b64encode(output).decode()})
    assert store.complete(done)[0].result == "accepted"
    assert store.get_job(sub.id).state == "succeeded"
    return sub.id


def test_prune_removes_old_finished_jobs_keeps_live_recent_and_referenced(store: Store) -> None:
    a = agent(store)
    data = {
        k: f"{k}-bytes".encode()
        for k in ("shared", "old_in", "old_out", "orphan", "fresh", "asked")
    }
    d = {k: sha(v) for k, v in data.items()}
    for k in ("shared", "old_in", "orphan", "fresh", "asked"):
        store.put_blob(d[k], data[k])

    def req(k: str) -> RequiredFile:
        return RequiredFile(path=f"{k}.txt", digest=d[k])

    old = run_one(store, a, [req("shared"), req("old_in")], data["old_out"])
    cancelled = store.submit(job([TaskSpec(command="true")])).id
    store.cancel_job(cancelled)
    recent = run_one(store, a, [req("shared")], b"recent-out")
    running = store.submit(job([TaskSpec(command="sleep 1")])).id
    (live,) = store.claim(a, 1).offers
    store.ack(live.attempt_id, live.token)
    queued = store.submit(job([TaskSpec(command="true")], name="queued")).id
    kept_rows = {j: rows_of_job(store, j) for j in (recent, running, queued)}
    assert kept_rows[running]["attempts"] == 1 and kept_rows[running]["events"] >= 2

    # Old enough: the finished ones, and (through SQL) the live ones too.
    backdate_jobs(store, [old, cancelled, running, queued], days=30)
    backdate_blobs(store, [d[k] for k in data if k != "fresh"], days=30)
    assert store.missing_blobs([d["asked"]]) == []  # a client was just told it is there

    report = store.prune("master-1", retention_s=14 * DAY)
    assert report is not None
    assert report.jobs == 2 and report.tasks == 2 and report.attempts == 1 and report.logs >= 1
    assert report.events >= 4
    for gone in (old, cancelled):
        with pytest.raises(NotFound):
            store.get_job(gone)
        assert set(rows_of_job(store, gone).values()) == {0}
    for kept in (recent, running, queued):
        assert rows_of_job(store, kept) == kept_rows[kept]
    # Blobs: only the old job's own, and the old unreferenced upload, are collected.
    assert sorted(store.missing_blobs(list(d.values()))) == sorted(
        [d["old_in"], d["old_out"], d["orphan"]]
    )
    assert report.blobs == 3
    assert report.bytes == sum(len(data[k]) for k in ("old_in", "old_out", "orphan"))
    # The running job is untouched and still completes.
    assert store.complete(ok(live))[0].result == "accepted"
    assert store.get_job(running).state == "succeeded"
    # Nothing more to do: a second round removes nothing.
    again = store.prune("master-1", retention_s=14 * DAY)
    assert again is not None and not again.removed


def test_prune_is_bounded_batches_each_one_transaction(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = []
    for i in range(7):
        j = store.submit(job([TaskSpec(command="true")], name=f"j{i}")).id
        store.cancel_job(j)
        ids.append(j)
    big = store.submit(job([TaskSpec(command="true") for _ in range(5)], name="big")).id
    store.cancel_job(big)
    backdate_jobs(store, [*ids, big], days=30)
    store.retention = RetentionPolicy(batch_jobs=3, batch_tasks=4)

    def count_jobs() -> int:
        return count(store, jobs, sa.true())

    # Jobs left after each write transaction of the round.
    left: list[int] = []
    real_write = store._write

    def spy(fn: Any) -> Any:
        result = real_write(fn)
        left.append(count_jobs())
        return result

    monkeypatch.setattr(store, "_write", spy)
    report = store.prune("master-1", retention_s=DAY)
    assert report is not None and report.jobs == 8 and report.tasks == 12
    assert count_jobs() == 0
    # 3 + 3 + 1 small jobs (at most 4 tasks per batch), the 5-task job alone, then blobs.
    drops = [a - b for a, b in zip([8, *left], left, strict=False) if a != b]
    assert drops == [3, 3, 1, 1], left
    assert report.batches == len(left) >= 5


def test_prune_takes_the_maintenance_lock(store: Store) -> None:
    j = store.submit(job([TaskSpec(command="true")])).id
    store.cancel_job(j)
    backdate_jobs(store, [j], days=30)
    assert store.try_lock("master-2", ttl_s=60)
    # Another holder has it: no pruning (nor reaping) here.
    assert store.prune("master-1", retention_s=DAY) is None
    assert store.maintain("master-1", ttl_s=60) is None
    assert store.get_job(j).state == "cancelled"
    assert store.release_lock("master-2")
    report = store.prune("master-1", retention_s=DAY, ttl_s=60)
    assert report is not None and report.jobs == 1
    holder = store.lock_holder()
    assert holder is not None and holder[0] == "master-1" and holder[1] > store.db_now()
    assert store.prune("master-2", retention_s=DAY) is None  # held by master-1 now


def test_prune_due_follows_the_policy(store: Store) -> None:
    j = store.submit(job([TaskSpec(command="true")])).id
    store.cancel_job(j)
    backdate_jobs(store, [j], days=3)
    store.retention = RetentionPolicy(retention_s=None)
    assert store.prune_due("master-1") is None  # retention off: keep everything
    assert store.get_job(j).state == "cancelled"
    store.retention = RetentionPolicy(retention_s=7 * DAY)
    report = store.prune_due("master-1")
    assert report is not None and report.jobs == 0  # 3 days old: kept
    store.retention = RetentionPolicy(retention_s=2 * DAY, interval_s=3600)
    store._next_prune_at = 0.0
    report = store.prune_due("master-1")
    assert report is not None and report.jobs == 1
    assert store.prune_due("master-1") is None  # not due again for an hour


def test_a_stale_blob_stored_again_by_a_completion_gets_its_grace_back(store: Store) -> None:
    a = agent(store)
    data = b"same output as a month ago"
    store.put_blob(sha(data), data)
    backdate_blobs(store, [sha(data)], days=30)
    finished = run_one(store, a, [], data)  # the same bytes, inline, in its completion
    backdate_jobs(store, [finished], days=30)
    report = store.prune("master-1", retention_s=14 * DAY)
    assert report is not None and report.jobs == 1 and report.blobs == 0
    assert store.has_blob(sha(data))  # unreferenced now, but within its grace
    assert store.pruned_total.jobs == 1


def test_a_second_holder_does_not_prune_while_one_does(
    store: Store, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = []
    for i in range(3):
        j = store.submit(job([TaskSpec(command="true")], name=f"j{i}")).id
        store.cancel_job(j)
        ids.append(j)
    backdate_jobs(store, ids, days=30)
    other = make_store(db_url)  # a second master on the same database
    in_batch, finish = threading.Event(), threading.Event()
    b_started = threading.Event()
    real_batch = store._prune_jobs
    real_write = other._write

    def paused_batch(t: Any, *args: Any) -> Any:
        out = real_batch(t, *args)  # the lock is taken, the jobs deleted: not committed yet
        in_batch.set()
        finish.wait(10)
        return out

    def write_b(fn: Any) -> Any:
        b_started.set()
        return real_write(fn)

    monkeypatch.setattr(store, "_prune_jobs", paused_batch)
    monkeypatch.setattr(other, "_write", write_b)
    try:
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(store.prune, "master-1", DAY, 60.0)
            assert in_batch.wait(10)
            second = pool.submit(other.prune, "master-2", DAY, 60.0)
            assert b_started.wait(10)
            finish.set()
            a, b = first.result(20), second.result(20)
    finally:
        finish.set()
        other.close()
    assert b is None  # it waited for the first holder's batch, then found the lock taken
    assert a is not None and a.jobs == 3


def test_a_finished_job_with_a_task_still_in_flight_is_kept(store: Store) -> None:
    j = store.submit(job([TaskSpec(command="true"), TaskSpec(command="true")])).id
    store.cancel_job(j)
    backdate_jobs(store, [j], days=30)
    # Whatever ended the job, a task of it that an agent still runs keeps it.
    with store.engine.begin() as conn:
        first = conn.execute(sa.select(sa.func.min(tasks.c.id)).where(tasks.c.job_id == j))
        conn.execute(
            sa.update(tasks).where(tasks.c.id == first.scalar_one()).values(state="running")
        )
    report = store.prune("master-1", retention_s=DAY)
    assert report is not None and report.jobs == 0
    assert rows_of_job(store, j)["tasks"] == 2
    with store.engine.begin() as conn:
        conn.execute(sa.update(tasks).where(tasks.c.job_id == j).values(state="cancelled"))
    report = store.prune("master-1", retention_s=DAY)
    assert report is not None and report.jobs == 1
