#!/usr/bin/env python3
"""Claim cost of the scheduler (issue 13): fair share against plain priority order.

For each number of ready jobs (default 1, 100 and 10,000; one task each, and
every job that is dispatched is replaced, so that many stay ready), one store
(SQLite, a temporary file; ``--pg`` also a throwaway PostgreSQL cluster) is
filled twice, in two runs made in the same process:

- **fair share**: the jobs come from 50 owners (weights 1..3), so every claim
  window holds several owners and the scheduler reads their slot-seconds
  (cached as the store does) and orders by share;
- **plain**: the same jobs from one owner: the same SQL, the same scheduler,
  no share to weigh: priority and age only.

One agent (4 slots) claims 4 tasks at a time, then completes them in a claim
of its own; only the claims that offer are timed (ending tasks and jobs, and
submitting, cost the same in both and are not the scheduler's). With one
ready job there is one owner: both runs are the same work. Prints milliseconds
per offered task for both and the overhead of fair share (target: at most
+20 %).

    python bench/claim_cost.py [--jobs 1,100,10000] [--claims 300] [--pg]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from herder.api_models import AgentRegister, Completion, JobSubmit, StageSpec, TaskSpec
from herder.store import Store

sys.path.insert(0, str(Path(__file__).resolve().parent))
from store import durable_cluster  # bench/store.py: the same PostgreSQL helper

OWNERS = 50


def _submit(store: Store, j: int, fair: bool) -> None:
    store.submit(
        JobSubmit(
            name=f"job{j}",
            owner=f"user{j % OWNERS}" if fair else "user0",
            priority=(j % 3) * 10,
            stages=[StageSpec(name="s", tasks=[TaskSpec(command="true")])],
        )
    )


def _run(url: str, jobs: int, fair: bool, claims: int) -> float:
    """Milliseconds of claim per offered task."""
    store = Store.open(url)
    try:
        for owner in range(OWNERS if fair else 1):
            store.set_owner_weight(f"user{owner}", 1.0 + owner % 3)
        for j in range(jobs):
            _submit(store, j, fair)
        agent, _ = store.register_agent(
            AgentRegister(name="bench", hostname="bench", slots=4, cpus=4)
        )
        spent = 0.0
        offered = 0
        next_job = jobs
        for _ in range(claims):
            t0 = time.perf_counter()
            out = store.claim(agent.id, 4)
            spent += time.perf_counter() - t0
            offered += len(out.offers)
            done = [
                Completion(attempt_id=o.attempt_id, token=o.token, outcome="exited", exit_code=0)
                for o in out.offers
            ]
            store.claim(agent.id, 0, completions=done)  # not timed: the tasks' and jobs' ends
            for _ in out.offers:  # not timed: as many jobs ready as before
                _submit(store, next_job, fair)
                next_job += 1
        return 1000.0 * spent / max(offered, 1)
    finally:
        store.close()


@contextlib.contextmanager
def _urls(pg: bool) -> Iterator[list[tuple[str, str]]]:
    with tempfile.TemporaryDirectory(prefix="herder-claim-cost-") as tmp:
        urls = [("sqlite", f"sqlite:///{tmp}/{{name}}.db")]
        if not pg:
            yield urls
            return
        import psycopg

        with durable_cluster() as dsn:

            def pg_url(name: str) -> str:
                with psycopg.connect(dsn, autocommit=True) as conn:
                    conn.execute(f'CREATE DATABASE "{name}"')
                return (
                    dsn.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://")
                    + f"/{name}"
                )

            urls.append(("postgresql", "pg:{name}"))
            _urls.pg_url = pg_url  # type: ignore[attr-defined]
            yield urls


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", default="1,100,10000")
    ap.add_argument("--claims", type=int, default=300)
    ap.add_argument("--repeat", type=int, default=3, help="runs of each; the median is printed")
    ap.add_argument("--pg", action="store_true", help="also on a throwaway PostgreSQL cluster")
    args = ap.parse_args()
    sizes = [int(x) for x in args.jobs.split(",")]
    print(
        f"{'db':<11} {'ready jobs':>10} {'plain ms/task':>14} {'fair ms/task':>13} {'overhead':>9}"
    )
    with _urls(args.pg) as urls:
        n = 0
        for db, pattern in urls:
            for jobs in sizes:
                plain, fair = [], []
                for _ in range(args.repeat):
                    for is_fair, into in ((False, plain), (True, fair)):
                        n += 1
                        name = f"c{n}"
                        url = (
                            _urls.pg_url(name)  # type: ignore[attr-defined]
                            if pattern.startswith("pg:")
                            else pattern.format(name=name)
                        )
                        into.append(_run(url, jobs, is_fair, args.claims))
                p, f = statistics.median(plain), statistics.median(fair)
                print(f"{db:<11} {jobs:>10} {p:>14.3f} {f:>13.3f} {100 * (f / p - 1):>+8.0f}%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
