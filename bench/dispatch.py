#!/usr/bin/env python3
"""Dispatch overhead: N tasks of `true` through a real master and 2 agent
slots, against `xargs -P2 true` on the same count, in the same run.

Prints both rates and their ratio. The herder time runs from the submit
request to the job's finish as the database recorded it (polling only detects
the end; it does not stretch the figure).

    python bench/dispatch.py [--tasks 2000] [--db sqlite|postgresql+psycopg://…]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from herder.api_models import JobSubmit
from herder.client import HerderClient
from herder.localfarm import LocalFarm


def bench_xargs(n: int, parallel: int) -> float:
    start = time.perf_counter()
    subprocess.run(
        ["xargs", f"-P{parallel}", "-n1", "true"],
        input="\n".join(str(i) for i in range(n)).encode(),
        check=True,
    )
    return time.perf_counter() - start


def _cpu(pid: int) -> float:
    import psutil

    try:
        proc = psutil.Process(pid)
        total = proc.cpu_times().user + proc.cpu_times().system
        total += proc.cpu_times().children_user + proc.cpu_times().children_system
        return total
    except psutil.Error:
        return 0.0


def _requests(url: str) -> int:
    """Requests the master has handled so far (its /metrics counter)."""
    import httpx

    for line in httpx.get(f"{url}/metrics", timeout=5).text.splitlines():
        if line.startswith("herder_requests_total "):
            return int(float(line.split()[1]))
    return 0


def bench_herder(
    n: int, slots: int, agents: int, db: str | None, workdir: Path
) -> tuple[float, float, dict[str, float], int]:
    with LocalFarm(db_url=db, workdir=workdir) as farm:
        farm.start_master()
        per_agent = max(1, slots // agents)
        for i in range(agents):
            farm.start_agent(slots=per_agent, name=f"bench{i}")
        farm.wait_agents(agents)
        spec = JobSubmit.model_validate(
            {"name": "dispatch", "stages": [{"name": "s", "tasks": [{"command": "true"}] * n}]}
        )
        procs = {"master": farm.master} | {f"agent{i}": p for i, p in enumerate(farm.agents)}
        cpu0 = {k: _cpu(p.pid) for k, p in procs.items() if p is not None}
        req0 = _requests(farm.url)
        with HerderClient(farm.url) as client:
            t0 = time.perf_counter()
            job = client.submit_job(spec)
            while True:
                summary = next(j for j in client.list_jobs(limit=5) if j.id == job.id)
                if summary.state in ("succeeded", "failed", "cancelled"):
                    break
                time.sleep(0.05)
            wall = time.perf_counter() - t0
            if summary.state != "succeeded":
                sys.exit(f"benchmark job ended {summary.state}: {summary.counts}")
            assert summary.finished_at is not None
            db_elapsed = (summary.finished_at - summary.created_at).total_seconds()
        cpu = {k: _cpu(p.pid) - cpu0[k] for k, p in procs.items() if p is not None}
        requests = _requests(farm.url) - req0
        return db_elapsed, wall, cpu, requests


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--tasks", type=int, default=2000)
    ap.add_argument("--slots", type=int, default=2)
    ap.add_argument("--agents", type=int, default=1)
    ap.add_argument("--db", default=None, help="database URL (default: SQLite in a temp dir)")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="herder-bench-") as tmp:
        herder_s, wall_s, cpu, requests = bench_herder(
            args.tasks, args.slots, args.agents, args.db, Path(tmp)
        )
    xargs_s = bench_xargs(args.tasks, args.slots)
    herder_rate = args.tasks / herder_s
    xargs_rate = args.tasks / xargs_s
    print(
        f"tasks: {args.tasks} of `true`, {args.slots} slots ({args.agents} agent(s)), db: {args.db or 'sqlite'}"
    )
    print(f"xargs -P{args.slots}:   {xargs_s:7.3f} s  {xargs_rate:8.1f} tasks/s")
    print(
        f"herder:      {herder_s:7.3f} s  {herder_rate:8.1f} tasks/s  (wall incl. submit+poll {wall_s:.3f} s)"
    )
    print(f"ratio herder/xargs: {herder_rate / xargs_rate:.3f}x")
    per_task = ", ".join(f"{k} {v * 1000 / args.tasks:.2f} ms" for k, v in cpu.items())
    print(f"CPU per task (incl. children): {per_task}")
    print(f"master requests per task (incl. the client's polling): {requests / args.tasks:.2f}")


if __name__ == "__main__":
    main()
