"""Three masters behind a DNS alias; one killed, one stopped mid-job (DESIGN §6; seeds/000).

Masters on 127.0.0.2, 127.0.0.3 and 127.0.0.4 (one port, one PostgreSQL
database). tests/dnsserver.py serves ``_herder._tcp.masters.herder.test`` SRV
records (priorities 10/20/30, so every agent starts on the first) and the A
records of their targets on a loopback port. Agents run with ``--dns-name``
and ``--resolver`` only (no configured list). While a job of 60 tasks (sleep
0.2, an output file and stdout) runs, the first master is killed (SIGKILL)
and then the second stopped (SIGTERM): the agents move on to the live master,
the job finishes, every task has exactly one succeeded attempt, and the
failures the agents met appear in the master directory.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

import pg
from dnsserver import DnsServer
from herder.api_models import JobSubmit, StageSpec, TaskSpec
from herder.client import HerderClient
from herder.localfarm import LocalFarm, Proc, _herder_argv
from herder.store import Store
from waiting import port_free_on, wait_for

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(90)]

HOSTS = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
ALIAS = "masters.herder.test"
HEARTBEAT_S = 0.5


@pytest.fixture(autouse=True)
def _fast_heartbeats(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HERDER_MASTER_HEARTBEAT_S", str(HEARTBEAT_S))


@pytest.fixture
def three_masters(pg_dsn: str, tmp_path: Path) -> Iterator[tuple[list[LocalFarm], str]]:
    port = port_free_on(HOSTS)
    db_url = pg.create_database(pg_dsn)
    farms = [
        # ack_timeout 5 s: an offer whose answer died with m1 comes back in seconds
        LocalFarm(
            db_url=db_url,
            host=h,
            port=port,
            workdir=tmp_path / h,
            lease_s=5.0,
            ack_timeout_s=5.0,
            log_level="info",
        )
        for h in HOSTS
    ]
    try:
        for farm in farms:  # one after the other: the first one migrates the database
            farm.start_master()
        yield farms, db_url
    finally:
        for farm in farms:
            farm.close()
        try:
            pg.drop_database(pg_dsn, db_url)
        except Exception:
            pass


def test_agents_follow_the_live_master(
    three_masters: tuple[list[LocalFarm], str], tmp_path: Path
) -> None:
    farms, db_url = three_masters
    port = farms[0].port
    agents: list[Proc] = []
    with DnsServer() as dns:
        for i, host in enumerate(HOSTS):
            dns.add_a(f"m{i + 1}.herder.test", host, ttl=5)
            dns.add_srv(ALIAS, 10 * (i + 1), 10, port, f"m{i + 1}.herder.test", ttl=5)
        try:
            for i in range(2):
                name = f"dns{i}"
                argv = [
                    *_herder_argv(),
                    "agent",
                    "--dns-name",
                    ALIAS,
                    "--resolver",
                    dns.address,
                    "--slots",
                    "2",
                    "--name",
                    name,
                    "--state-dir",
                    str(tmp_path / f"state-{name}"),
                    "--backoff-max",
                    "2",
                    "--log-level",
                    "info",
                ]
                proc = Proc(argv, tmp_path / f"{name}.log", farms[0]._env())
                proc.start()
                agents.append(proc)

            def logs() -> str:
                return "\n".join(a.log_text()[-3000:] for a in agents)

            m1, m2, m3 = farms
            m1.wait_agents(2)
            with HerderClient([f.url for f in farms], timeout=5) as c:
                job = c.submit_job(
                    JobSubmit(
                        name="failover",
                        stages=[
                            StageSpec(
                                name="s",
                                tasks=[
                                    TaskSpec(
                                        command=f"sleep 0.2; echo {i} > o{i}.txt; echo task-{i}"
                                    )
                                    for i in range(60)
                                ],
                            )
                        ],
                    )
                )

                def done_count() -> int:
                    return int(c.get_job(job.id).counts.get("succeeded", 0))

                wait_for(lambda: done_count() >= 10, 30, "first tasks done", logs)
                assert m1.master is not None and m2.master is not None
                m1.master.kill9()  # SIGKILL: no goodbye in the directory
                at_kill = done_count()
                wait_for(lambda: done_count() >= at_kill + 10, 30, "progress after the kill", logs)
                assert m2.master.stop() is not None  # SIGTERM: a clean stop
                final = wait_for(
                    lambda: (j := c.get_job(job.id)).state in ("succeeded", "failed") and j,
                    45,
                    "job finished",
                    logs,
                )
            assert final.state == "succeeded"
            store = Store.open(db_url, migrate=False)
            try:
                full = store.get_job(job.id)
                tasks = [t for st in full.stages for t in st.tasks]
                assert len(tasks) == 60
                for t in tasks:
                    ok = [a for a in t.attempts if a.state == "succeeded"]
                    assert len(ok) == 1, (t.id, [(a.id, a.state) for a in t.attempts])
            finally:
                store.close()
            # The agents ended on the live master: their last requests went there.
            for a in agents:
                assert a.alive(), a.log_text()[-3000:]
            # Failures to reach the killed master are in the directory.

            def failures_of(url: str) -> int:
                r = httpx.get(f"{m3.url}/api/v1/masters", params={"all": "true"}, timeout=5)
                for m in r.json()["masters"]:
                    if m["url"] == url:
                        return int(m["failures"])
                return -1

            wait_for(lambda: failures_of(m1.url) > 0, 15, "failures of the killed master", logs)
            listed = {
                m["url"]: m
                for m in httpx.get(f"{m3.url}/api/v1/masters", timeout=5).json()["masters"]
            }
            assert m1.url not in listed and m2.url not in listed and m3.url in listed, listed
            mid = next(
                m["id"]
                for m in httpx.get(
                    f"{m3.url}/api/v1/masters", params={"all": "true"}, timeout=5
                ).json()["masters"]
                if m["url"] == m1.url
            )
            r = httpx.get(f"{m3.url}/api/v1/masters/{mid}/failures", timeout=5)
            assert r.status_code == 200, r.text
            body = r.json()
            items = body["failures"] if isinstance(body, dict) else body
            assert items and any(
                str(f.get("reporter", "")).startswith("agent:dns") for f in items
            ), body
            assert any("event=master_failures_reported" in a.log_text() for a in agents)
            # The live master served the end of the job.
            me = httpx.get(f"{m3.url}/api/v1/masters", timeout=5).json()["masters"]
            assert next(m["requests"] for m in me if m["url"] == m3.url) > 20, me
            # DNS was really used: the agents asked for the SRV records.
            assert any(q[1] == "SRV" for q in dns.queries), dns.queries
        finally:
            for a in agents:
                a.signal(signal.SIGTERM)
            for a in agents:
                if a.wait(20) is None:
                    a.kill9()
