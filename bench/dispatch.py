#!/usr/bin/env python3
"""Dispatch overhead: N tasks of `true` through a real master and 2 agent
slots, against `xargs -P2 true` on the same count, in the same run.

Prints both rates and their ratio. The herder time runs from the submit
request to the job's finish as the database recorded it (polling, every
0.2 s, only detects the end; it does not stretch the figure). An untimed
warm-up job of 4 x slots tasks runs first on the same farm. Jobs are
submitted as `herder run` submits them (`?view=ids`). xargs runs before and
after herder; the faster of the two is the baseline.

CPU per task of the master and of the agent (psutil: each process, its live
children and the children it reaped, so the agent's figure includes the
`true` commands it ran), and the floor: the CPU of spawning `true` the way
the agent does (new session, stdin /dev/null, stdout/stderr to a file, wait),
in a loop in this process. "Beyond spawn" = agent CPU/task - spawn CPU/task.

--db postgresql starts a throwaway PostgreSQL cluster (as tests/pg.py does,
but with fsync and synchronous_commit on: durable commits); --db URL uses an
existing database.

--peers also runs the same N `true` tasks, in the same run, through
  Dask    distributed.LocalCluster(n_workers=1, threads_per_worker=2,
          processes=True), client.map(run_true, range(N)), gather;
  Celery  redis-server (this script starts it on 127.0.0.1, no persistence)
          as broker and result backend, a worker --pool prefork
          --concurrency 2, a group of N tasks, from send to all results in.
Each task runs subprocess.run(['true']).

    python bench/dispatch.py [--tasks 4000] [--db sqlite|postgresql|URL] [--peers]

Targets: master <= 0.2 ms CPU/task, agent <= 0.3 ms CPU/task beyond spawn;
herder >= 0.9x xargs on SQLite (>= 0.7x on PostgreSQL); herder >= 2x each peer.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import _benchlib as bl

MASTER_TARGET_MS = 0.2
AGENT_TARGET_MS = 0.3


def run_true(i: int) -> int:
    import subprocess

    subprocess.run(["true"], check=True)
    return i


def _requests(url: str) -> int:
    """Requests the master has handled so far (its /metrics counter)."""
    import httpx

    for line in httpx.get(f"{url}/metrics", timeout=5).text.splitlines():
        if line.startswith("herder_requests_total "):
            return int(float(line.split()[1]))
    return 0


@dataclass
class HerderResult:
    db_elapsed: float
    wall: float
    cpu: dict[str, float]
    requests: int


def bench_herder(
    n: int,
    slots: int,
    agents: int,
    db: str | None,
    workdir: Path,
    timeout: float,
    postmaster: int | None = None,
) -> HerderResult:
    from herder.api_models import JobSubmit
    from herder.client import HerderClient
    from herder.localfarm import LocalFarm

    with LocalFarm(db_url=db, workdir=workdir) as farm:
        farm.start_master()
        per_agent = max(1, slots // agents)
        for i in range(agents):
            farm.start_agent(slots=per_agent, name=f"bench{i}")
        farm.wait_agents(agents)

        def spec(name: str, count: int) -> JobSubmit:
            return JobSubmit.model_validate(
                {"name": name, "stages": [{"name": "s", "tasks": [{"command": "true"}] * count}]}
            )

        def run(client: HerderClient, job_spec: JobSubmit) -> tuple[float, float]:
            t0 = time.perf_counter()
            # As `herder run` submits: the answer names the task ids (a full view of
            # 4,000 tasks would cost the master more than dispatching them).
            job = client.submit_job_ids(job_spec)
            while True:
                summary = next(j for j in client.list_jobs(limit=5) if j.id == job.id)
                if summary.state in ("succeeded", "failed", "cancelled"):
                    break
                if time.perf_counter() - t0 > timeout:
                    raise RuntimeError(f"job not done after {timeout:.0f} s: {summary.counts}")
                # The figure is the database's own submit-to-finish time, so this
                # poll only detects the end: slow enough not to weigh on the master.
                time.sleep(0.2)
            wall = time.perf_counter() - t0
            if summary.state != "succeeded":
                raise RuntimeError(f"benchmark job ended {summary.state}: {summary.counts}")
            assert summary.finished_at is not None
            return (summary.finished_at - summary.created_at).total_seconds(), wall

        procs = {"master": farm.master} | {f"agent{i}": p for i, p in enumerate(farm.agents)}
        with HerderClient(farm.url) as client:
            # A farm that has run a job before (as the peers are warmed up): the
            # master builds its models' validators on first use, once.
            run(client, spec("warm-up", 4 * slots))
            cpu0 = {k: bl.tree_cpu(p.pid) for k, p in procs.items() if p is not None}
            req0 = _requests(farm.url)
            pg0 = bl.tree_cpu(postmaster) if postmaster else 0.0
            db_elapsed, wall = run(client, spec("dispatch", n))
        cpu = {k: bl.tree_cpu(p.pid) - cpu0[k] for k, p in procs.items() if p is not None}
        if postmaster:
            cpu["postgres server"] = bl.tree_cpu(postmaster) - pg0
        requests = _requests(farm.url) - req0
        farm.stop(at_once=True)
        return HerderResult(db_elapsed, wall, cpu, requests)


@contextlib.contextmanager
def database(choice: str | None) -> Iterator[tuple[str | None, str, int | None]]:
    """(SQLAlchemy URL or None for SQLite in the farm's dir, description,
    the postmaster's pid when the cluster is ours)."""
    if choice in (None, "sqlite"):
        yield None, "sqlite", None
        return
    if choice not in ("postgresql", "postgres", "pg"):
        yield choice, choice.split("@")[-1], None
        return
    pg = bl._tests_pg()
    with bl.durable_pg_cluster() as cluster:
        url = pg.create_database(cluster.dsn, prefix="herder_bench")
        try:
            desc = f"postgresql, throwaway cluster ({bl.pg_settings(cluster.dsn)})"
            yield url, desc, cluster.postmaster
        finally:
            with contextlib.suppress(Exception):
                pg.drop_database(cluster.dsn, url)


# ---------------------------------------------------------------- peers


@dataclass
class PeerResult:
    name: str
    seconds: float | None = None
    cpu: dict[str, float] | None = None
    skipped: str = ""


def _descendants_cpu() -> float:
    return sum(bl.tree_cpu(p) for p in bl.descendants())


def bench_dask(n: int, slots: int, timeout: float) -> PeerResult:
    res = PeerResult("dask")
    try:
        import logging

        from distributed import Client, LocalCluster, wait
    except ImportError as exc:
        res.skipped = f"dask[distributed] not installed ({exc}): {bl.INSTALL_HINT}"
        return res
    with (
        LocalCluster(
            n_workers=1,
            threads_per_worker=slots,
            processes=True,
            host="127.0.0.1",
            dashboard_address=None,
            silence_logs=logging.ERROR,
        ) as cluster,
        Client(cluster) as client,
    ):
        client.submit(run_true, -1, pure=False).result(timeout=60)  # workers up, warm
        w0, s0 = _descendants_cpu(), bl.self_cpu()
        t0 = time.perf_counter()
        futures = client.map(run_true, range(n))
        wait(futures, timeout=timeout)
        results = client.gather(futures)
        res.seconds = time.perf_counter() - t0
        res.cpu = {
            "worker": _descendants_cpu() - w0,
            "scheduler+client (bench process)": bl.self_cpu() - s0,
        }
        assert sorted(results) == list(range(n))
    return res


CELERY_TASKS = textwrap.dedent(
    """\
    import os
    import subprocess

    from celery import Celery

    url = os.environ["HERDER_BENCH_REDIS_URL"]
    app = Celery("herder_bench_tasks", broker=url, backend=url)
    app.conf.update(
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        result_expires=3600,
    )


    @app.task(name="herder_bench_tasks.run_true")
    def run_true(i):
        subprocess.run(["true"], check=True)
        return i
    """
)


def _stop(proc: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    import signal

    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # pool children left in its group
    bl.unregister_helper(proc.pid)


def bench_celery(n: int, slots: int, timeout: float, tmp: Path) -> PeerResult:
    res = PeerResult("celery")
    try:
        import celery  # noqa: F401
        import redis  # noqa: F401
    except ImportError as exc:
        res.skipped = f"celery[redis] not installed ({exc}): {bl.INSTALL_HINT}"
        return res
    import shutil

    if shutil.which("redis-server") is None:
        res.skipped = f"redis-server not found: {bl.INSTALL_HINT}"
        return res
    d = tmp / "celery"
    d.mkdir()
    (d / "herder_bench_tasks.py").write_text(CELERY_TASKS)
    port = bl.free_port()
    url = f"redis://127.0.0.1:{port}/0"
    env = bl.bench_env(HERDER_BENCH_REDIS_URL=url, PYTHONPATH=str(d))
    redis_log = open(d / "redis.log", "wb")  # noqa: SIM115
    redis_proc = subprocess.Popen(
        [
            *("redis-server", "--port", str(port), "--bind", "127.0.0.1"),
            *("--save", "", "--appendonly", "no", "--dir", str(d), "--daemonize", "no"),
        ],
        stdin=subprocess.DEVNULL,
        stdout=redis_log,
        stderr=redis_log,
        start_new_session=True,
    )
    redis_log.close()
    bl.register_helper(redis_proc.pid)
    worker: subprocess.Popen[bytes] | None = None
    try:
        bl.wait_port(port, redis_proc)
        worker_log = open(d / "worker.log", "wb")  # noqa: SIM115
        worker = subprocess.Popen(
            [
                *(sys.executable, "-m", "celery", "-A", "herder_bench_tasks", "worker"),
                *("--pool", "prefork", "--concurrency", str(slots), "--loglevel", "WARNING"),
                *("--without-gossip", "--without-mingle", "--without-heartbeat", "-n", "bench@%h"),
            ],
            cwd=d,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=worker_log,
            stderr=worker_log,
            start_new_session=True,
        )
        worker_log.close()
        bl.register_helper(worker.pid)
        os.environ["HERDER_BENCH_REDIS_URL"] = url
        sys.path.insert(0, str(d))
        import herder_bench_tasks as tasks
        from celery import group

        try:
            tasks.run_true.delay(-1).get(timeout=60)  # worker up, warm
        except Exception as exc:
            log = (d / "worker.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"celery worker did not answer: {exc}\n{log}") from exc
        w0, r0, s0 = bl.tree_cpu(worker.pid), bl.tree_cpu(redis_proc.pid), bl.self_cpu()
        t0 = time.perf_counter()
        result = group(tasks.run_true.s(i) for i in range(n)).apply_async()
        values = result.get(timeout=timeout)
        res.seconds = time.perf_counter() - t0
        res.cpu = {
            "worker": bl.tree_cpu(worker.pid) - w0,
            "redis": bl.tree_cpu(redis_proc.pid) - r0,
            "client (bench process)": bl.self_cpu() - s0,
        }
        assert sorted(values) == list(range(n))
        tasks.app.close()
    finally:
        if worker is not None:
            _stop(worker)
        _stop(redis_proc, grace=5)
    return res


# ---------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--tasks", type=int, default=4000, help="tasks of `true` (default 4000)")
    ap.add_argument("--slots", type=int, default=2, help="parallelism everywhere (default 2)")
    ap.add_argument("--agents", type=int, default=1)
    ap.add_argument(
        "--db",
        default=None,
        help="sqlite (default: a file in a temp dir), postgresql (a throwaway durable "
        "cluster), or a SQLAlchemy URL",
    )
    ap.add_argument("--peers", action="store_true", help="also Dask and Celery on the same N")
    ap.add_argument(
        "--spawn-floor", type=int, default=2000, help="spawns to time for the floor (default 2000)"
    )
    ap.add_argument("--timeout", type=float, default=600.0, help="limit per row, s (default 600)")
    args = ap.parse_args()
    bl.setup_process()
    n, slots = args.tasks, args.slots

    why = bl.herder_importable()
    if why:
        print(f"herder cannot start right now: {why}")
        return 1

    failed = False
    xargs = [bl.xargs_true(n, slots, args.timeout)]
    herder: HerderResult | None = None
    db_desc = "sqlite"
    with bl.tempdir("herder-bench-dispatch-") as tmp:
        try:
            with database(args.db) as (url, db_desc, postmaster):
                herder = bench_herder(
                    n, slots, args.agents, url, tmp / "farm", args.timeout, postmaster
                )
        except Exception as exc:
            print(f"herder: FAILED: {exc}", file=sys.stderr)
            failed = True
        xargs.append(bl.xargs_true(n, slots, args.timeout))
        spawn_s = bl.spawn_floor(min(args.spawn_floor, max(n, 1)))
        peers: list[PeerResult] = []
        if args.peers:
            runners = {
                "dask": lambda: bench_dask(n, slots, args.timeout),
                "celery": lambda: bench_celery(n, slots, args.timeout, tmp),
            }
            for name, run in runners.items():
                try:
                    peers.append(run())
                except Exception as exc:
                    peers.append(PeerResult(name, skipped=f"FAILED: {exc!r}"[:2000]))
                    failed = True

    for x in xargs:
        if not x.ok:
            print(f"xargs failed: {x.failure()}", file=sys.stderr)
            return 1
    xargs_s = min(x.wall for x in xargs)
    xargs_rate = n / xargs_s
    pg = db_desc.startswith("postgresql")
    print(f"tasks: {n} of `true`, {slots} slots ({args.agents} agent(s)), db: {db_desc}")
    print(
        f"xargs -P{slots}:     {xargs_s:8.3f} s  {xargs_rate:8.1f} tasks/s   "
        f"(runs: {', '.join(f'{x.wall:.3f}' for x in xargs)} s; CPU {xargs[0].cpu * 1000 / n:.2f} ms/task)"
    )
    herder_rate = None
    if herder is not None:
        herder_rate = n / herder.db_elapsed
        ratio = herder_rate / xargs_rate
        want = 0.7 if pg else 0.9
        print(
            f"herder:        {herder.db_elapsed:8.3f} s  {herder_rate:8.1f} tasks/s   "
            f"ratio {ratio:.3f}x xargs  (target >= {want}x: {bl.verdict(ratio, want, at_least=True)}; "
            f"wall incl. submit+poll {herder.wall:.3f} s)"
        )
    else:
        print("herder:        FAILED (see stderr)")
    for p in peers:
        if p.seconds is None:
            why = p.skipped if p.skipped.startswith("FAILED") else f"SKIPPED, {p.skipped}"
            print(f"{p.name + ':':14s} {why}")
            continue
        rate = n / p.seconds
        line = f"{p.name + ':':14s} {p.seconds:8.3f} s  {rate:8.1f} tasks/s   ratio {rate / xargs_rate:.3f}x xargs"
        if herder_rate is not None:
            r = herder_rate / rate
            line += (
                f"; herder {r:.2f}x {p.name} (target >= 2x: {bl.verdict(r, 2.0, at_least=True)})"
            )
        print(line)
        if p.cpu:
            print(
                "    CPU per task: "
                + ", ".join(f"{k} {v * 1000 / n:.2f} ms" for k, v in p.cpu.items())
            )
    print(
        f"spawn floor (Popen true, new session, wait; in-process): {spawn_s * 1000:.3f} ms CPU/task"
    )
    if herder is not None:
        per = {k: v * 1000 / n for k, v in herder.cpu.items()}
        print("herder CPU per task: " + ", ".join(f"{k} {v:.2f} ms" for k, v in per.items()))
        m = per.get("master", 0.0)
        print(
            f"  master:                {m:.3f} ms  (target <= {MASTER_TARGET_MS}: {bl.verdict(m, MASTER_TARGET_MS)})"
        )
        for k, v in per.items():
            if k.startswith("agent"):
                beyond = v - spawn_s * 1000
                print(
                    f"  {k} beyond its spawns: {beyond:.3f} ms  = {v:.3f} - {spawn_s * 1000:.3f}"
                    f"  (target <= {AGENT_TARGET_MS}: {bl.verdict(beyond, AGENT_TARGET_MS)})"
                )
        print(f"  master requests per task (incl. the client's polling): {herder.requests / n:.2f}")
    print(bl.load_note())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
