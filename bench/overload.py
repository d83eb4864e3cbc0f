#!/usr/bin/env python3
"""Request latency through one master under overload, with and without read-only
masters beside it (issue 10, DESIGN §7).

A primary PostgreSQL and a hot standby (``pg_basebackup -R``, tests/pgstandby.py);
one read-write ``herder master`` on the primary with a small admission queue
(``--admission-workers``, ``--admission-depth``), and in the second row two
read-only masters on the standby. ``--clients`` threads, each a real client
that knows only the read-write master, read the job list (``--jobs`` jobs)
for ``--duration`` seconds. A request's latency is the whole operation
through the client loop: busy deferrals, alternates tried, the priority
round's wait in the queue.

    python bench/overload.py [--clients 24] [--duration 10] [--jobs 120]

Prints, per row: requests served, throughput, p50/p99 latency, how many
answers were busy deferrals, and which masters served the reads.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from collections import Counter
from contextlib import ExitStack
from pathlib import Path

import _benchlib as bl

sys.path.insert(0, str(bl.ROOT / "tests"))
# The bench measures deferrals, not authentication: its masters check no token.
os.environ.setdefault("HERDER_INSECURE_NO_AUTH", "1")

import httpx

import pg
import pgstandby
from herder.api_models import JobSubmit, StageSpec, TaskSpec
from herder.client import HerderClient
from mastersproc import MasterProc


def busy_total(url: str) -> int:
    text = httpx.get(f"{url}/metrics", timeout=5, trust_env=False).text
    for line in text.splitlines():
        if line.startswith("herder_admission_deferred_total "):
            return int(float(line.split()[1]))
    return 0


def wait_listed(url: str, count: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = httpx.get(f"{url}/api/v1/masters", timeout=5, trust_env=False)
        if r.status_code == 200 and len(r.json()["masters"]) == count:
            return
        time.sleep(0.1)
    raise RuntimeError(f"{url}: {count} masters not listed within {timeout}s")


def load(url: str, clients: int, duration: float, jobs: int) -> tuple[list[float], Counter[str]]:
    latencies: list[float] = []
    served: Counter[str] = Counter()
    lock = threading.Lock()
    stop = time.monotonic() + duration

    def worker() -> None:
        with HerderClient(masters=[url], timeout=120) as c:
            while time.monotonic() < stop:
                start = time.perf_counter()
                got = c.list_jobs(limit=jobs)
                took = time.perf_counter() - start
                assert len(got) == jobs
                with lock:
                    latencies.append(took)
                    served[str(c.preferred)] += 1

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies, served


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--clients", type=int, default=24, help="client threads (default 24)")
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per row (default 10)")
    ap.add_argument("--jobs", type=int, default=120, help="jobs each read lists (default 120)")
    ap.add_argument("--workers", type=int, default=2, help="admission workers (default 2)")
    ap.add_argument("--depth", type=int, default=4, help="admission depth (default 4)")
    args = ap.parse_args()
    bl.setup_process()
    os.environ["HERDER_MASTER_HEARTBEAT_S"] = "0.5"
    # Loopback masters this bench starts and stops: no tokens to hand around.
    os.environ["HERDER_INSECURE_NO_AUTH"] = "1"
    work = Path(tempfile.mkdtemp(prefix="herder-overload-"))
    flags = ("--admission-workers", str(args.workers), "--admission-depth", str(args.depth))
    rows: list[tuple[str, list[float], Counter[str], int, dict[str, str]]] = []
    with ExitStack() as stack:
        primary = stack.enter_context(pg.own_cluster())
        standby = stack.enter_context(pgstandby.hot_standby(primary))
        db = pg.create_database(primary.dsn)
        from sqlalchemy.engine import make_url

        standby_db = make_url(db).set(port=standby.port).render_as_string(hide_password=False)
        rw = MasterProc(db, work, "rw", *flags).start()
        stack.callback(rw.stop)
        with HerderClient(masters=[rw.url], timeout=30) as c:
            for i in range(args.jobs):
                spec = JobSubmit(
                    name=f"overload-{i}",
                    stages=[StageSpec(name="s", tasks=[TaskSpec(command="true")])],
                )
                c.submit_job(spec)
        pgstandby.wait_replayed(primary, standby)

        names = {rw.url: "rw"}
        before = busy_total(rw.url)
        lat, served = load(rw.url, args.clients, args.duration, args.jobs)
        rows.append(("one master", lat, served, busy_total(rw.url) - before, dict(names)))

        for i in (1, 2):
            ro = MasterProc(standby_db, work, f"ro{i}", "--read-only").start()
            stack.callback(ro.stop)
            names[ro.url] = f"ro{i}"
        wait_listed(rw.url, 3)
        time.sleep(1.0)  # the read-write master's directory copy refreshes
        before = busy_total(rw.url)
        lat, served = load(rw.url, args.clients, args.duration, args.jobs)
        rows.append(("+ 2 read-only", lat, served, busy_total(rw.url) - before, dict(names)))

    print(
        f"{args.clients} clients, {args.duration:g} s per row, reads of {args.jobs} jobs; "
        f"read-write master: {args.workers} workers, depth {args.depth}"
    )
    print(f"{'row':<15}{'reads':>7}{'reads/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'busy':>7}  served by")
    for name, lat, served, busy, names in rows:
        by = ", ".join(f"{names.get(u, u)}={n}" for u, n in sorted(served.items()))
        print(
            f"{name:<15}{len(lat):>7}{len(lat) / args.duration:>9.0f}"
            f"{pct(lat, 50) * 1000:>9.1f}{pct(lat, 99) * 1000:>9.1f}{busy:>7}  {by}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
