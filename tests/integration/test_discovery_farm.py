"""Finding masters through a real DNS server on loopback, and failing over between real masters."""

from __future__ import annotations

import random
import socket
from collections.abc import Iterator

import pytest

import pg
from dnsserver import DnsServer
from herder.api_models import JobSubmit, StageSpec, TaskSpec
from herder.client import HerderClient
from herder.client.discovery import MasterDiscovery, report_failures
from herder.localfarm import LocalFarm, free_port

ALIAS = "masters.herder.test"
HOSTS = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]


@pytest.fixture
def dns_server() -> Iterator[DnsServer]:
    with DnsServer("127.0.0.1") as server:
        yield server


def test_alias_resolves_to_a_records_and_srv(dns_server: DnsServer) -> None:
    for i, host in enumerate(HOSTS):
        dns_server.add_a(ALIAS, host, ttl=30)
        dns_server.add_a(f"m{i + 2}.herder.test", host, ttl=30)
    dns_server.add_srv(ALIAS, 10, 60, 7002, "m2.herder.test")
    dns_server.add_srv(ALIAS, 10, 40, 7003, "m3.herder.test")
    dns_server.add_srv(ALIAS, 20, 0, 7004, "m4.herder.test")

    by_a = MasterDiscovery(
        dns_name=ALIAS, resolver=dns_server.address, srv=False, directory=False
    ).candidates()
    assert sorted(by_a) == [f"http://{h}:6240" for h in HOSTS]

    firsts: set[str] = set()
    for seed in range(30):
        d = MasterDiscovery(
            ["http://127.0.0.9:1"],
            dns_name=ALIAS,
            resolver=dns_server.address,
            directory=False,
            rng=random.Random(seed),
        )
        got = d.candidates()
        assert got[0] == "http://127.0.0.9:1"  # configured first
        assert set(got[1:3]) == {"http://127.0.0.2:7002", "http://127.0.0.3:7003"}
        assert got[3:] == ["http://127.0.0.4:7004"]  # the higher priority number last
        assert d.last_dns is not None and d.last_dns.source == "srv" and d.last_dns.ttl == 30
        firsts.add(got[1])
    assert len(firsts) == 2  # equal priority: both weights get to go first


def _port_free_on(port: int, hosts: list[str]) -> bool:
    for host in hosts:
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                return False
    return True


@pytest.mark.postgres
def test_client_fails_over_between_masters_found_by_dns(dns_server: DnsServer, pg_dsn: str) -> None:
    hosts = HOSTS[:2]
    port = next(p for p in (free_port(hosts[0]) for _ in range(50)) if _port_free_on(p, hosts))
    db_url = pg.create_database(pg_dsn)
    farms = [LocalFarm(db_url=db_url, host=h, port=port) for h in hosts]
    opened: list[MasterDiscovery] = []
    try:
        for farm in farms:  # one after the other: the first one migrates the database
            farm.start_master()
            dns_server.add_a(ALIAS, farm.host, ttl=60)
            dns_server.add_srv(ALIAS, 10, 10, port, farm.host.replace(".", "-") + ".herder.test")
            dns_server.add_a(farm.host.replace(".", "-") + ".herder.test", farm.host)

        discovery = MasterDiscovery(
            dns_name=ALIAS,
            resolver=dns_server.address,
            srv=False,
            default_port=port,
            rng=random.Random(1),
        )
        opened.append(discovery)
        found = discovery.candidates()
        assert sorted(found) == sorted(f.url for f in farms)
        # The directory endpoint may not exist yet: 404 means "no directory", not an error.
        assert discovery.problems == []

        with HerderClient(discovery=discovery, timeout=5) as client:
            job = client.submit_job(
                JobSubmit(
                    name="dns", stages=[StageSpec(name="s", tasks=[TaskSpec(command="true")])]
                )
            )
            first = client.preferred
            assert first == found[0]

            dead = next(f for f in farms if f.url == first)
            live = next(f for f in farms if f.url != first)
            assert dead.master is not None
            dead.master.kill9()

            # Same database behind every master: the live one knows the job.
            assert client.get_job(job.id).name == "dns"
            assert client.preferred == live.url
            assert [f.url for f in client.failures] == [dead.url]
            assert client.failures[0].request == f"GET /api/v1/jobs/{job.id}"

            # A fresh client (an agent starting up) finds the survivor the same way.
            with HerderClient(discovery=discovery, timeout=5) as other:
                assert other.health()["status"] == "ok"
                assert other.preferred == live.url

            # Reporting works whether or not the failures endpoint exists yet.
            report = report_failures(client, discovery=discovery)
            assert report.error is None and report.sent + report.skipped == 1
            assert client.failures == []

        # SRV records lead to the same survivor.
        by_srv = MasterDiscovery(dns_name=ALIAS, resolver=dns_server.address, srv=True)
        opened.append(by_srv)
        assert sorted(by_srv.candidates()) == sorted(f.url for f in farms)
        with HerderClient(discovery=by_srv, timeout=5) as client:
            assert client.get_job(job.id).id == job.id
            assert client.preferred == live.url
    finally:
        for d in opened:
            d.close()
        for farm in farms:
            farm.close()
        try:
            pg.drop_database(pg_dsn, db_url)
        except Exception:
            pass
