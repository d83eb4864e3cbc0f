#!/usr/bin/env python3
"""Talkback wake: claim-to-start latency of a task submitted to an idle farm.

Two masters, A and B, on one PostgreSQL database; one agent (1 slot) that
knows only A and long-polls it. Single-task jobs (`true`) go to B, one after
the other, each once the agent is parked again. Without talkback the agent
hears of B's job only at A's recheck (a 1 s ticker); with it, B wakes the
agent, which claims at once. Also a single-master figure for reference (the
agent parked on the master the job is submitted to: its long-poll wakes at
once, with or without talkback).

Latency is measured by the database clock: job created → attempt offered
(the claim), and → attempt done (`true` ends at once; its completion carries
the implied ack, so this is claim + run + report).

    python bench/talkback.py [--reps 20] [--pg-dsn postgresql://…]

PostgreSQL: --pg-dsn, else HERDER_TEST_PG_DSN, else a throwaway cluster
(tests/pg.py). Without PostgreSQL binaries it falls back to one master on
SQLite (the cross-master case cannot be measured then) and says so.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from herder.api_models import JobSubmit
from herder.client import HerderClient
from herder.localfarm import LocalFarm, free_port

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def _job(i: int) -> JobSubmit:
    return JobSubmit.model_validate(
        {"name": f"wake{i}", "stages": [{"name": "s", "tasks": [{"command": "true"}]}]}
    )


def _measure(submit_url: str, reps: int) -> tuple[list[float], list[float]]:
    offered, started = [], []
    with HerderClient(submit_url) as client:
        for i in range(reps):
            # The agent is idle and parked again; a random gap, so submissions
            # fall at every phase of the masters' 1 s recheck ticker.
            time.sleep(random.uniform(0.3, 1.3))
            job = client.submit_job(_job(i))
            deadline = time.monotonic() + 30
            while True:
                view = client.get_job(job.id)
                if view.state in ("succeeded", "failed", "cancelled"):
                    break
                if time.monotonic() > deadline:
                    sys.exit(f"job {job.id} did not finish in 30 s")
                time.sleep(0.02)
            att = view.stages[0].tasks[0].attempts[0]
            # A short task's start is never acknowledged on its own (its
            # completion implies it): "done" is when the master recorded the result.
            end = att.started_at or att.finished_at
            assert att.offered_at is not None and end is not None
            offered.append((att.offered_at - view.created_at).total_seconds() * 1000)
            started.append((end - view.created_at).total_seconds() * 1000)
    return offered, started


def _p90(xs: list[float]) -> float:
    return statistics.quantiles(xs, n=10, method="inclusive")[-1] if len(xs) > 1 else xs[0]


def _fmt(xs: list[float]) -> str:
    return f"median {statistics.median(xs):7.1f} ms  p90 {_p90(xs):7.1f} ms"


@contextlib.contextmanager
def _postgres(dsn: str | None) -> Iterator[str | None]:
    """A fresh database URL on PostgreSQL, or None when there is none to use."""
    import pg

    try:
        cm = contextlib.nullcontext(dsn) if dsn else pg.maintenance_dsn()
        with cm as maint:
            assert maint is not None
            url = pg.create_database(maint, prefix="herder_bench")
            try:
                yield url
            finally:
                with contextlib.suppress(Exception):
                    pg.drop_database(maint, url)
    except pg.PostgresUnavailable as exc:
        print(f"note: no PostgreSQL ({str(exc).splitlines()[0]})", file=sys.stderr)
        yield None


def _run(
    db_url: str | None, workdir: Path, reps: int, talkback: bool, two: bool
) -> tuple[list[float], list[float]]:
    port = free_port("127.0.0.2")
    a = LocalFarm(db_url=db_url, host="127.0.0.2", port=port, workdir=workdir / "a")
    b = LocalFarm(db_url=a.db_url, host="127.0.0.3", port=port, workdir=workdir / "b")
    try:
        a.start_master()
        if two:
            b.start_master()
        a.start_agent(slots=1, extra=["--talkback", "127.0.0.1:0" if talkback else "off"])
        a.wait_agents(1)
        return _measure(b.url if two else a.url, reps)
    finally:
        a.close()
        b.close()


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--pg-dsn", default=os.environ.get("HERDER_TEST_PG_DSN"))
    args = ap.parse_args()

    rows: list[tuple[str, list[float], list[float]]] = []
    with tempfile.TemporaryDirectory(prefix="herder-bench-") as tmp, _postgres(args.pg_dsn) as pg:
        root = Path(tmp)
        if pg is not None:
            print(f"two masters (A 127.0.0.2, B 127.0.0.3) on PostgreSQL; {args.reps} jobs each")
            for tb in (False, True):
                rows.append(
                    (
                        f"submit to B, agent on A, talkback {'on ' if tb else 'off'}",
                        *_run(pg, root / f"two-{tb}", args.reps, tb, two=True),
                    )
                )
            single_db = pg
        else:
            print("PostgreSQL unavailable: one master on SQLite only (no cross-master figure)")
            single_db = None
        for tb in (False, True):
            rows.append(
                (
                    f"one master, talkback {'on ' if tb else 'off'}",
                    *_run(single_db, root / f"one-{tb}", args.reps, tb, two=False),
                )
            )
    print("job created → attempt offered / → attempt done (database clock):")
    width = max(len(r[0]) for r in rows)
    for name, offered, started in rows:
        print(f"  {name:<{width}}  offered: {_fmt(offered)}   done: {_fmt(started)}")


if __name__ == "__main__":
    main()
