"""A failed or cancelled job stops all its work at once (issue 9), with real processes.

A real master and real agents (``herder.localfarm``) on SQLite and on
PostgreSQL: a task that fails for good kills its siblings' processes on the
agents within a second (talkback ``cancel``), every task of the job ends
terminal, and the idle farm afterwards writes nothing to the job's tables
for 30 s, counted on the database (row triggers on both dialects, and
PostgreSQL's own ``pg_stat_user_tables``). ``POST /jobs/{id}/cancel`` kills
running processes through talkback, and through the next heartbeat where
talkback cannot reach. The embedded farm of ``herder run`` does the same
through its in-process agent.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import sqlalchemy as sa

from herder.api_models import AgentRegister, JobSubmit, JobView
from herder.client import HerderClient
from herder.localfarm import LocalFarm, Proc, free_port
from herder.store import Store
from waiting import metric, wait_for

TOKEN = "job-stop-talkback-token-0123456789"
TABLES = ("jobs", "tasks", "attempts", "events", "log_chunks")
# Liveness writes may stay, at their own pace: agents' heartbeats, and the
# maintenance lock's renewal (once half its TTL is gone, not every reap round).
AUDITED = (*TABLES, "agents", "maintenance_lock")
MAINTENANCE_TTL_S = 10.0  # MasterConfig.maintenance_ttl_s
IDLE_WINDOW_S = 30.0  # the idle window


# ------------------------------------------------------------------ helpers


def sleeps_under(pid: int) -> list[psutil.Process]:
    """``sleep`` processes descended from ``pid`` (the commands an agent runs)."""
    try:
        kids = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    out = []
    for p in kids:
        try:
            if p.name() == "sleep" and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def agent_views(url: str) -> dict[str, dict[str, Any]]:
    agents = httpx.get(f"{url}/api/v1/agents", timeout=5).json()["agents"]
    return {a["name"]: a for a in agents}


def talkback_status(view: dict[str, Any]) -> dict[str, Any]:
    auth = {"authorization": f"Bearer {TOKEN}"}
    r = httpx.get(f"{view['talkback_url']}/talkback/status", headers=auth, timeout=5)
    r.raise_for_status()
    return dict(r.json())


def spec(tasks: list[dict[str, Any]], name: str = "stop") -> JobSubmit:
    return JobSubmit.model_validate({"name": name, "stages": [{"name": "s", "tasks": tasks}]})


def start_farm(farm: LocalFarm, agents: int, *extra: str) -> list[Proc]:
    farm.start_master()
    procs = [
        farm.start_agent(
            slots=2,
            extra=[
                "--talkback",
                "127.0.0.1:0",
                "--talkback-token",
                TOKEN,
                "--claim-ahead",
                "0",  # each agent holds only what its slots run
                *extra,
            ],
        )
        for _ in range(agents)
    ]
    farm.wait_agents(agents)
    # Submit only once every agent's poll is parked at the master: a job that
    # comes while a first poll is still on its way gets the agent woken as well
    # (talkback), its two claims get offers for twice its slots, and what it
    # hands back ("released") waits behind the sleepers.
    wait_for(
        lambda: metric(farm.url, "herder_parked_claims") == agents,
        30,
        "every agent parked",
        lambda: logs(farm),
    )
    return procs


def logs(farm: LocalFarm) -> str:
    parts = [farm.master.log_text() if farm.master else ""]
    parts += [p.log_text() for p in farm.agents]
    return "\n".join(parts)


class WriteAudit:
    """Every row written to the job's tables, counted by the database itself.

    Row triggers (AFTER INSERT/UPDATE/DELETE, FOR EACH ROW) append one row to
    ``write_audit`` per row written, synchronously, on both dialects: nothing
    written to those tables escapes them. Installed before the master starts.
    ``agents`` is audited too: its heartbeat writes may stay, but an idle poll
    must not write it.
    """

    def __init__(self, db_url: str) -> None:
        Store.open(db_url, migrate=True).close()  # the schema, as the master finds it
        self.engine = sa.create_engine(db_url, poolclass=sa.pool.NullPool)
        self.is_pg = self.engine.dialect.name == "postgresql"
        with self.engine.begin() as conn:
            if self.is_pg:
                conn.exec_driver_sql(
                    "CREATE TABLE write_audit (id bigserial PRIMARY KEY, tbl text NOT NULL, "
                    "op text NOT NULL)"
                )
                conn.exec_driver_sql(
                    "CREATE FUNCTION write_audit_row() RETURNS trigger LANGUAGE plpgsql AS $$ "
                    "BEGIN INSERT INTO write_audit (tbl, op) VALUES (TG_TABLE_NAME, TG_OP); "
                    "RETURN NULL; END $$"
                )
                for table in AUDITED:
                    conn.exec_driver_sql(
                        f"CREATE TRIGGER audit_{table} AFTER INSERT OR UPDATE OR DELETE ON {table} "
                        "FOR EACH ROW EXECUTE FUNCTION write_audit_row()"
                    )
            else:
                conn.exec_driver_sql(
                    "CREATE TABLE write_audit (id INTEGER PRIMARY KEY, tbl TEXT NOT NULL, "
                    "op TEXT NOT NULL)"
                )
                for table in AUDITED:
                    for op in ("INSERT", "UPDATE", "DELETE"):
                        conn.exec_driver_sql(
                            f"CREATE TRIGGER audit_{table}_{op.lower()} AFTER {op} ON {table} "
                            f"FOR EACH ROW BEGIN INSERT INTO write_audit (tbl, op) "
                            f"VALUES ('{table}', '{op}'); END"
                        )

    def rows(self) -> list[tuple[int, str, str]]:
        with self.engine.connect() as conn:
            return [
                (int(r[0]), str(r[1]), str(r[2]))
                for r in conn.exec_driver_sql("SELECT id, tbl, op FROM write_audit ORDER BY id")
            ]

    def pg_tuples(self) -> dict[str, int]:
        """PostgreSQL's own count of rows inserted, updated and deleted, per table."""
        with self.engine.connect() as conn:
            conn.exec_driver_sql("SELECT pg_stat_force_next_flush()")
            conn.exec_driver_sql("SELECT pg_stat_clear_snapshot()")
            return {
                str(r[0]): int(r[1])
                for r in conn.exec_driver_sql(
                    "SELECT relname, n_tup_ins + n_tup_upd + n_tup_del FROM pg_stat_user_tables "
                    f"WHERE relname IN ({', '.join(repr(t) for t in TABLES)})"
                )
            }

    def close(self) -> None:
        self.engine.dispose()


@pytest.fixture
def farm(tmp_path: Path, db_url: str) -> Iterator[LocalFarm]:
    f = LocalFarm(db_url=db_url, workdir=tmp_path / "farm", log_level="info")
    try:
        yield f
    finally:
        f.close(at_once=True)


# -------------------------------------------------------------------- tests


@pytest.mark.timeout(150)
def test_failed_task_stops_its_job_at_once_and_the_idle_farm_writes_nothing(
    farm: LocalFarm, db_url: str, tmp_path: Path
) -> None:
    audit = WriteAudit(db_url)
    try:
        agents = start_farm(farm, 2)
        started = tmp_path / "started"
        started.mkdir()
        # Would fail after 5 s and be retried (attempts left) if it were not stopped.
        sleeper = {"command": f"mktemp -p {started} >/dev/null; sleep 5; exit 1", "max_attempts": 3}
        # Fails for good (exit 3, one attempt) once three siblings run; exit 4 says they never did.
        boom = {
            "command": f"for i in $(seq 400); do [ $(ls {started} | wc -l) -ge 3 ] && exit 3; "
            "sleep 0.05; done; exit 4",
            "max_attempts": 1,
        }
        # four slots: boom and three sleepers run, two sleepers stay queued
        with HerderClient(farm.url) as client:
            job = client.submit_job(spec([boom, *[dict(sleeper) for _ in range(5)]]))

            def failed() -> JobView | None:
                view = client.get_job(job.id)
                return view if view.state == "failed" else None

            done = wait_for(failed, 60, "the job failed", lambda: logs(farm))
            assert done.finished_at is not None
            failed_at = done.finished_at.timestamp()
            wait_for(
                lambda: not any(sleeps_under(a.pid) for a in agents),
                10,
                "no sleep runs on any agent",
                lambda: logs(farm),
            )
            cleared_after = time.time() - failed_at
            # "At once": talkback (the job's reason travels with its cancel) told the
            # agents, not their heartbeats (every 10 s; one may come first by chance).
            cancels = [
                line
                for a in agents
                for line in a.log_text().splitlines()
                if "event=attempt_cancel " in line
            ]
            by_talkback = sum("reason='job failed: task" in line for line in cancels)
            by_heartbeat = sum("reason='cancelled by the master'" in line for line in cancels)
            assert by_talkback + by_heartbeat == 3 and by_talkback >= 1, cancels
            assert cleared_after < 3.0, f"siblings ran {cleared_after:.2f}s after the failure"

            view = client.get_job(job.id)
            tasks = [t for s in view.stages for t in s.tasks]
            boom_task = tasks[0]
            assert (boom_task.state, boom_task.exit_code) == ("failed", 3)  # siblings ran
            assert view.counts == {"failed": 1, "cancelled": 5}
            # Three sleepers ran (one file each); a fourth may have been offered
            # ahead of a free slot (claim-ahead) without starting.
            assert len(list(started.iterdir())) == 3
            offered = [[a.state for a in t.attempts] for t in tasks[1:] if t.attempts]
            assert len(offered) >= 3, offered
            # The three that ran were cancelled with their attempts, and nothing was
            # retried. An offer claimed ahead may have been handed back ("released":
            # the window closes once tasks prove long) before the job failed.
            assert sum(states.count("cancelled") for states in offered) >= 3, offered
            for states in offered:
                assert set(states) <= {"cancelled", "released"}, offered
                assert states.count("cancelled") <= 1, offered

        # Nothing is pending on the agents any more (no attempt, no delivery).
        views = agent_views(farm.url)
        for v in views.values():
            wait_for(
                lambda v=v: (lambda s: s["busy"] == 0 and not s["running"])(talkback_status(v)),
                10,
                f"agent {v['name']} idle",
            )

        # The idle window: a measurement, not a wait for a condition.
        window_start = time.monotonic()
        before = audit.rows()
        # the triggers saw the job's life (so they would see an idle write too)
        assert {tbl for _, tbl, _ in before} >= {"jobs", "tasks", "attempts", "events"}
        pg_before: dict[str, int] = {}
        if audit.is_pg:
            # pg_stat is flushed by each backend within seconds of its writes:
            # read the baseline once what came before the window is flushed.
            time.sleep(11.0)
            pg_before = audit.pg_tuples()
        time.sleep(max(0.0, IDLE_WINDOW_S - (time.monotonic() - window_start)))
        new = audit.rows()[len(before) :]
        job_writes = [w for w in new if w[1] in TABLES]
        assert job_writes == [], f"writes on an idle farm: {job_writes[:20]}"
        if audit.is_pg:
            assert audit.pg_tuples() == pg_before
        # The farm was alive all along: its agents' heartbeats came in (liveness
        # writes, one per agent every lease / 3 = 10 s), and nothing else wrote
        # the agents (an idle poll that wrote would add one per agent per second).
        assert farm.master is not None and farm.master.alive()
        assert all(a.alive() for a in agents)
        beats = [w for w in new if w[1] == "agents"]
        assert 2 <= len(beats) <= 2 * (IDLE_WINDOW_S / 10 + 2), beats
        # The master's idle maintenance is a read; the lock is renewed every TTL/2
        # (a write every reap round would be 30 here).
        renewals = [w for w in new if w[1] == "maintenance_lock"]
        assert 1 <= len(renewals) <= IDLE_WINDOW_S / (MAINTENANCE_TTL_S / 2) + 2, renewals
        assert "Traceback" not in logs(farm)
    finally:
        audit.close()


@pytest.mark.timeout(120)
def test_cancel_kills_running_processes_through_talkback_and_heartbeat(
    tmp_path: Path, db_url: str
) -> None:
    # lease 30 s: agents heartbeat every 10 s, so a kill within a second is talkback's
    farm = LocalFarm(db_url=db_url, workdir=tmp_path / "farm", log_level="info")
    try:
        reach, deaf = start_farm(farm, 2)
        views = agent_views(farm.url)
        # agent1's registered talkback endpoint is dead: the master cannot reach it
        dead = f"http://127.0.0.1:{free_port()}"
        v = views["agent1"]
        with HerderClient(farm.url) as client:
            client.register_agent(
                AgentRegister(
                    agent_id=v["id"],
                    name=v["name"],
                    hostname=v["hostname"],
                    slots=v["slots"],
                    talkback_url=dead,
                    talkback_token="x" * 32,
                )
            )
            job = client.submit_job(spec([{"command": "sleep 60"} for _ in range(4)]))
            wait_for(
                lambda: len(sleeps_under(reach.pid)) == 2 and len(sleeps_under(deaf.pid)) == 2,
                30,
                "two sleeps run on each agent",
                lambda: logs(farm),
            )
            # acknowledged (running in the database): a refused ack cannot be what stops them
            wait_for(
                lambda: client.get_job(job.id).counts == {"running": 4},
                30,
                "every task acknowledged",
                lambda: logs(farm),
            )
            t0 = time.monotonic()
            r = httpx.post(f"{farm.url}/api/v1/jobs/{job.id}/cancel", timeout=10)
            assert r.status_code == 200 and r.json()["state"] == "cancelled"
            wait_for(lambda: not sleeps_under(reach.pid), 5, "talkback killed", lambda: logs(farm))
            by_talkback = time.monotonic() - t0
            wait_for(lambda: not sleeps_under(deaf.pid), 20, "heartbeat killed", lambda: logs(farm))
            by_heartbeat = time.monotonic() - t0
            # The reasons below prove which way each agent was told; the clocks only
            # bound it (a heartbeat that just missed the cancel comes 10 s later).
            assert by_talkback < 3.0, f"talkback cancel took {by_talkback:.2f}s"
            assert by_heartbeat < 10.0 + 5.0, f"heartbeat cancel took {by_heartbeat:.2f}s"
            # each agent was told the way the test meant (the reason travels with the cancel)
            assert reach.log_text().count("reason='cancelled by user'") == 2, reach.log_text()
            assert deaf.log_text().count("reason='cancelled by the master'") == 2, deaf.log_text()
            view = client.get_job(job.id)
            assert view.counts == {"cancelled": 4}
            for t in (t for s in view.stages for t in s.tasks):
                assert [a.state for a in t.attempts] == ["cancelled"]
    finally:
        farm.close(at_once=True)


def test_embedded_farm_cancel_kills_its_in_process_agents_attempts(tmp_path: Path) -> None:
    from herder.embedded import EmbeddedFarm

    me = psutil.Process().pid
    # lease 30 s: the agent's heartbeat (every 10 s) is not what kills them
    with EmbeddedFarm(tmp_path / "state", 2) as farm:
        client = farm.client()
        job = client.submit_job(spec([{"command": "sleep 60"} for _ in range(2)]))
        wait_for(lambda: len(sleeps_under(me)) == 2, 30, "two sleeps run")
        t0 = time.monotonic()
        assert client.cancel_job(job.id).state == "cancelled"
        wait_for(lambda: not sleeps_under(me), 5, "the in-process agent killed them")
        # At once: not at the next heartbeat (10 s), nor the sleeps' end (60 s);
        # the margin is for a loaded machine.
        assert time.monotonic() - t0 < 3.0
        view = client.get_job(job.id)
        assert view.counts == {"cancelled": 2}
