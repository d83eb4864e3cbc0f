#!/usr/bin/env python3
"""Soak: many short tasks through a real farm while agents are killed, then retention.

N tasks of `true` (default 100,000, in --jobs jobs) through one master and
--agents agents (subprocesses, loopback). Every --kill-every seconds one
agent (in turn) is killed with SIGKILL and started again on the same state
directory (the same agent id): its attempts in flight are requeued by
reconciliation or the reaper, and every task must still be committed once.

Every --sample-every seconds it prints the master's RSS and open file
descriptors (psutil), tasks done and the rate: after warm-up both should be
flat. At the end: tasks with other than exactly one succeeded attempt (must
be 0), then the database's size and row counts before and after a prune with
a retention of 0 s through the code the masters' maintenance runs
(``Store.prune`` under the maintenance lock, in bounded batches), after the
farm stopped (the master lets the lock go when it stops); and what a round
that finds nothing past retention costs on the full database (a master runs
one a minute).

    python bench/soak.py [--tasks 100000] [--jobs 4] [--agents 2] [--slots 2]
                         [--kill-every 10] [--sample-every 10] [--db sqlite|postgresql|URL]

SQLite's file does not shrink when rows go (freed pages are reused): the
"used" figure is (page_count - freelist_count) * page_size; PostgreSQL's is
pg_database_size after a plain VACUUM (likewise, space is reused, not
returned).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import _benchlib as bl
from dispatch import database

MiB = 1024 * 1024


@dataclass
class Sample:
    t: float
    done: int
    rss: int
    fds: int
    kills: int


def _db_url(farm: Any) -> str:
    assert farm.db_url is not None
    return str(farm.db_url)


def count_rows(store: Any) -> dict[str, int]:
    import sqlalchemy as sa

    from herder.store.schema import attempts, blobs, events, jobs, log_chunks, tasks

    out: dict[str, int] = {}
    with store.engine.connect() as conn:
        for t in (jobs, tasks, attempts, events, log_chunks, blobs):
            out[t.name] = int(conn.execute(sa.select(sa.func.count()).select_from(t)).scalar_one())
    return out


def db_size(store: Any) -> tuple[int, int]:
    """(size on disk, bytes in use) of the database."""
    if store.dialect == "sqlite":
        with store.engine.connect() as conn:
            conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
            page = conn.exec_driver_sql("PRAGMA page_size").scalar_one()
            pages = conn.exec_driver_sql("PRAGMA page_count").scalar_one()
            free = conn.exec_driver_sql("PRAGMA freelist_count").scalar_one()
        path = Path(store.url.database)
        disk = sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))
        return int(disk), int((pages - free) * page)
    with store.engine.connect() as conn:
        conn = conn.execution_options(isolation_level="AUTOCOMMIT")
        conn.exec_driver_sql("VACUUM")
        size = conn.exec_driver_sql("SELECT pg_database_size(current_database())").scalar_one()
    return int(size), int(size)


def done_count(store: Any) -> int:
    import sqlalchemy as sa

    from herder.store.schema import tasks

    with store.engine.connect() as conn:
        return int(
            conn.execute(
                sa.select(sa.func.count())
                .select_from(tasks)
                .where(tasks.c.state.in_(("succeeded", "failed", "cancelled")))
            ).scalar_one()
        )


def not_exactly_once(store: Any) -> int:
    """Tasks whose succeeded attempts are not exactly one."""
    import sqlalchemy as sa

    from herder.store.schema import attempts, tasks

    ok = (
        sa.select(sa.func.count())
        .where(attempts.c.task_id == tasks.c.id, attempts.c.state == "succeeded")
        .scalar_subquery()
    )
    with store.engine.connect() as conn:
        return int(
            conn.execute(sa.select(sa.func.count()).select_from(tasks).where(ok != 1)).scalar_one()
        )


def run(args: argparse.Namespace, url: str | None, workdir: Path) -> int:
    import psutil

    from herder.api_models import JobSubmit
    from herder.client import HerderClient
    from herder.localfarm import LocalFarm, Proc
    from herder.store import Store

    per_job = [
        args.tasks // args.jobs + (1 if i < args.tasks % args.jobs else 0) for i in range(args.jobs)
    ]
    with LocalFarm(
        db_url=url, workdir=workdir, lease_s=args.lease, ack_timeout_s=args.lease
    ) as farm:
        farm.start_master()
        assert farm.master is not None
        names = [f"soak{i}" for i in range(args.agents)]
        agents: dict[str, Proc] = {n: farm.start_agent(args.slots, name=n) for n in names}
        farm.wait_agents(args.agents)
        master = psutil.Process(farm.master.pid)
        store = Store.open(_db_url(farm), migrate=False)
        try:
            t0 = time.monotonic()
            with HerderClient(farm.url, timeout=120) as client:
                ids = [
                    client.submit_job(
                        JobSubmit.model_validate(
                            {
                                "name": f"soak{j}",
                                "stages": [{"name": "s", "tasks": [{"command": "true"}] * n}],
                            }
                        )
                    ).id
                    for j, n in enumerate(per_job)
                ]
            print(
                f"submitted {args.tasks} tasks in {len(ids)} jobs in {time.monotonic() - t0:.1f} s; "
                f"{args.agents} agent(s) x {args.slots} slots, one killed -9 every "
                f"{args.kill_every:g} s, lease {args.lease:g} s"
            )
            print(f"{'t (s)':>7} {'done':>8} {'tasks/s':>8} {'RSS MiB':>8} {'fds':>5} {'kills':>6}")
            samples: list[Sample] = []
            kills = 0
            next_kill = time.monotonic() + args.kill_every
            next_sample = time.monotonic()
            last_done, last_t = 0, t0
            while True:
                now = time.monotonic()
                if now - t0 > args.timeout:
                    print(f"FAILED: not done after {args.timeout:.0f} s", file=sys.stderr)
                    return 1
                if now >= next_kill:
                    name = names[kills % len(names)]
                    agents[name].kill9()
                    farm.agents.remove(agents[name])
                    agents[name] = farm.start_agent(args.slots, name=name)
                    kills += 1
                    next_kill = now + args.kill_every
                done = done_count(store)
                if now >= next_sample or done >= args.tasks:
                    s = Sample(now - t0, done, master.memory_info().rss, master.num_fds(), kills)
                    samples.append(s)
                    rate = (done - last_done) / max(now - last_t, 1e-9)
                    last_done, last_t = done, now
                    print(
                        f"{s.t:7.1f} {s.done:8d} {rate:8.0f} {s.rss / MiB:8.1f} {s.fds:5d} {s.kills:6d}",
                        flush=True,
                    )
                    next_sample = now + args.sample_every
                if done >= args.tasks:
                    break
                time.sleep(0.5)
            elapsed = time.monotonic() - t0
            states = [store.get_job(i, include_tasks=False).state for i in ids]
            bad = not_exactly_once(store)
            warm = samples[len(samples) // 3 :] or samples
            print(
                f"done: {args.tasks} tasks in {elapsed:.1f} s ({args.tasks / elapsed:.0f} tasks/s), "
                f"jobs {states}, {kills} agent kills"
            )
            print(
                f"master after warm-up (last {len(warm)} samples): RSS "
                f"{min(s.rss for s in warm) / MiB:.1f}..{max(s.rss for s in warm) / MiB:.1f} MiB, "
                f"fds {min(s.fds for s in warm)}..{max(s.fds for s in warm)}"
            )
            print(f"tasks without exactly one succeeded attempt: {bad}")
        finally:
            store.close()
        farm.stop(at_once=True)  # the master lets the maintenance lock go

    store = Store.open(_db_url(farm), migrate=False)
    try:
        before_rows, (before_disk, before_used) = count_rows(store), db_size(store)
        # What a master's round costs when nothing is past retention (once a minute).
        t1 = time.monotonic()
        idle = store.prune("bench:soak", 3650 * 86400.0)
        idle_s = time.monotonic() - t1
        t1 = time.monotonic()
        total: dict[str, int] = {}
        rounds = 0
        while True:
            report = store.prune("bench:soak", 0.0)
            if report is None:
                print("FAILED: the maintenance lock is held by someone else", file=sys.stderr)
                return 1
            rounds += 1
            for k in ("jobs", "tasks", "attempts", "events", "logs", "blobs", "bytes", "batches"):
                total[k] = total.get(k, 0) + getattr(report, k)
            if not report.more:
                break
        prune_s = time.monotonic() - t1
        after_rows, (after_disk, after_used) = count_rows(store), db_size(store)
    finally:
        store.close()
    assert idle is not None
    print(
        f"prune round with nothing past retention (full database): {idle_s * 1000:.0f} ms, "
        f"{idle.batches} transactions"
    )
    print(
        f"prune (retention 0): {prune_s:.1f} s, {rounds} round(s), {total.get('batches', 0)} "
        "transactions: " + ", ".join(f"{k}={v}" for k, v in total.items() if k != "batches")
    )
    print(
        f"database: disk {before_disk / MiB:.1f} -> {after_disk / MiB:.1f} MiB, in use "
        f"{before_used / MiB:.1f} -> {after_used / MiB:.1f} MiB"
    )
    print("rows before: " + ", ".join(f"{k}={v}" for k, v in before_rows.items()))
    print("rows after:  " + ", ".join(f"{k}={v}" for k, v in after_rows.items()))
    return 1 if bad or any(s != "succeeded" for s in states) else 0


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--tasks", type=int, default=100_000, help="tasks of `true` (default 100000)")
    ap.add_argument("--jobs", type=int, default=4, help="jobs the tasks are split over (default 4)")
    ap.add_argument("--agents", type=int, default=2, help="agents (default 2)")
    ap.add_argument("--slots", type=int, default=2, help="slots per agent (default 2)")
    ap.add_argument("--kill-every", type=float, default=10.0, help="s between agent kills (10)")
    ap.add_argument("--sample-every", type=float, default=10.0, help="s between samples (10)")
    ap.add_argument("--lease", type=float, default=10.0, help="lease and ack timeout, s (10)")
    ap.add_argument(
        "--db",
        default=None,
        help="sqlite (default: a file in a temp dir), postgresql (a throwaway durable "
        "cluster), or a SQLAlchemy URL",
    )
    ap.add_argument("--timeout", type=float, default=7200.0, help="limit of the run, s")
    args = ap.parse_args()
    if args.tasks < 1 or args.jobs < 1 or args.agents < 1 or args.slots < 1:
        ap.error("--tasks, --jobs, --agents and --slots must be at least 1")
    bl.setup_process()
    why = bl.herder_importable()
    if why:
        print(f"herder cannot start right now: {why}")
        return 1
    with bl.tempdir("herder-bench-soak-") as tmp, database(args.db) as (url, desc, _pm):
        print(f"db: {desc}")
        return run(args, url, tmp / "farm")


if __name__ == "__main__":
    sys.exit(main())
