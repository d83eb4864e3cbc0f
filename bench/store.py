#!/usr/bin/env python3
"""The store's hot path in-process (no HTTP): claim with the previous batch's completions.

Creates a job of N ``true`` tasks, then W worker threads (each a registered
agent) loop ``store.claim(agent, max_tasks=K, completions=<previous batch, exited 0>)``
until the job succeeds. Prints tasks/s and the process's CPU milliseconds
per task (``time.process_time``: every thread of this process, i.e. the
master's share; a PostgreSQL server's own CPU is not in it), for SQLite (a
temporary file) and PostgreSQL with durable commits (``fsync`` and
``synchronous_commit`` on).

    python bench/store.py [--tasks 4000] [--workers 2] [--batch 2]
                          [--pg DSN | --no-pg] [--sqlite-only] [--repeat 1]

Without ``--pg``, a throwaway durable cluster is started if PostgreSQL's
server binaries are installed (as tests/pg.py finds them; as the
``postgres`` user when run as root).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

from herder.api_models import AgentRegister, Completion, JobSubmit, StageSpec, TaskSpec
from herder.store import Store

ROOT = Path(__file__).resolve().parent.parent


def _pg_helpers() -> ModuleType:
    spec = importlib.util.spec_from_file_location("herder_tests_pg", ROOT / "tests" / "pg.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@contextlib.contextmanager
def durable_cluster() -> Iterator[str]:
    """A throwaway PostgreSQL cluster with durable commits; yields its maintenance DSN."""
    pg = _pg_helpers()
    bindir = pg.find_pg_bin()
    user: str | None = None
    base = Path(tempfile.mkdtemp(prefix="herder-bench-pg-"))
    if os.geteuid() == 0:
        import pwd

        user = "postgres"
        pw = pwd.getpwnam(user)
        os.chown(base, pw.pw_uid, pw.pw_gid)
    base.chmod(0o700)
    data = base / "data"
    port = pg._free_port()
    db_user = user or "postgres"
    pg._run([str(bindir / "initdb"), "-D", str(data), "-U", db_user, "-A", "trust"], user)
    opts = (
        f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={base} "
        "-c fsync=on -c synchronous_commit=on -c full_page_writes=on "
        "-c max_connections=100 -c shared_buffers=128MB"
    )
    pg._run(
        [
            str(bindir / "pg_ctl"),
            "-D",
            str(data),
            "-l",
            str(base / "log"),
            "-o",
            opts,
            "-w",
            "start",
        ],
        user,
    )
    try:
        yield f"postgresql://{db_user}@127.0.0.1:{port}/postgres"
    finally:
        import subprocess

        subprocess.run(
            pg._as_user(
                [str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"], user
            ),
            capture_output=True,
            check=False,
        )
        shutil.rmtree(base, ignore_errors=True)


def _job(n: int) -> JobSubmit:
    return JobSubmit(
        name="bench", stages=[StageSpec(name="s0", tasks=[TaskSpec(command="true")] * n)]
    )


def run(store: Store, n: int, workers: int, batch: int) -> dict[str, float]:
    agents = []
    for i in range(workers):
        view, _ = store.register_agent(
            AgentRegister(agent_id=f"bench-{i}", name=f"bench-{i}", hostname="bench", slots=batch)
        )
        agents.append(view.id)
    t0, c0 = time.perf_counter(), time.process_time()
    submit = getattr(store, "submit", None)  # Store.submit, or an older store's submit_job
    job_id = submit(_job(n)).id if submit is not None else store.submit_job(_job(n))[0].id
    submit_wall, submit_cpu = time.perf_counter() - t0, time.process_time() - c0

    done = threading.Event()
    errors: list[BaseException] = []
    claims = [0]

    def worker(agent_id: str) -> None:
        prev: list[Completion] = []
        try:
            while not done.is_set():
                out = store.claim(agent_id, max_tasks=batch, completions=prev)
                claims[0] += 1
                prev = [
                    Completion(
                        attempt_id=o.attempt_id, token=o.token, outcome="exited", exit_code=0
                    )
                    for o in out.offers
                ]
                if not prev:
                    if store.get_job(job_id, include_tasks=False).state == "succeeded":
                        done.set()
                    else:
                        time.sleep(0.001)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)
            done.set()

    threads = [threading.Thread(target=worker, args=(a,)) for a in agents]
    t0, c0 = time.perf_counter(), time.process_time()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    if errors:
        raise errors[0]
    state = store.get_job(job_id, include_tasks=False).state
    assert state == "succeeded", state
    return {
        "tasks_per_s": n / wall,
        "cpu_ms_per_task": 1000 * cpu / n,
        "wall_s": wall,
        "claims": claims[0],
        "submit_ms": 1000 * submit_wall,
        "submit_cpu_ms": 1000 * submit_cpu,
    }


def report(label: str, r: dict[str, float]) -> None:
    print(
        f"{label:<22} {r['tasks_per_s']:8.0f} tasks/s  {r['cpu_ms_per_task']:6.3f} CPU ms/task  "
        f"({r['wall_s']:.2f} s, {r['claims']:.0f} claims; submit {r['submit_ms']:.0f} ms, "
        f"{r['submit_cpu_ms']:.0f} ms CPU)",
        flush=True,
    )


def bench_sqlite(args: argparse.Namespace) -> None:
    for _ in range(args.repeat):
        with tempfile.TemporaryDirectory(prefix="herder-bench-") as d:
            store = Store.open(f"sqlite:///{d}/bench.db")
            try:
                report("sqlite", run(store, args.tasks, args.workers, args.batch))
            finally:
                store.close()


def bench_pg(args: argparse.Namespace, maint_dsn: str) -> None:
    pg = _pg_helpers()
    for _ in range(args.repeat):
        url = pg.create_database(maint_dsn, prefix="herder_bench")
        try:
            store = Store.open(url)
            try:
                with store.engine.connect() as conn:
                    sc = conn.exec_driver_sql("SHOW synchronous_commit").scalar()
                    fs = conn.exec_driver_sql("SHOW fsync").scalar()
                report(
                    f"postgresql (sc={sc},fsync={fs})",
                    run(store, args.tasks, args.workers, args.batch),
                )
            finally:
                store.close()
        finally:
            pg.drop_database(maint_dsn, url)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tasks", type=int, default=4000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch", type=int, default=2, help="max_tasks per claim (K)")
    p.add_argument("--pg", metavar="DSN", help="maintenance DSN of a PostgreSQL server")
    p.add_argument("--no-pg", action="store_true", help="SQLite only")
    p.add_argument("--pg-only", action="store_true", help="PostgreSQL only")
    p.add_argument("--repeat", type=int, default=1)
    args = p.parse_args()
    print(f"{args.tasks} tasks, {args.workers} workers, batch {args.batch}", flush=True)
    if not args.pg_only:
        bench_sqlite(args)
    if args.no_pg:
        return 0
    if args.pg:
        bench_pg(args, args.pg)
        return 0
    try:
        _pg_helpers().find_pg_bin()
    except Exception as exc:
        print(f"postgresql: skipped ({exc})", file=sys.stderr)
        return 0
    with durable_cluster() as dsn:
        bench_pg(args, dsn)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
