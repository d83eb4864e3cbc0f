"""herder.client.discovery: ordering, SRV, shuffling, TTL cache, DNS failures, backoff, reports."""

from __future__ import annotations

import itertools
import json
import random
from collections import Counter
from collections.abc import Iterator

import httpx
import pytest

from dnsserver import DnsServer
from herder.client import HerderClient, MasterFailure, NoMasterAvailable
from herder.client.discovery import (
    DNS_NO_ANSWER,
    DNS_NXDOMAIN,
    DNS_REFUSED,
    DNS_SERVFAIL,
    DNS_TIMEOUT,
    Backoff,
    MasterDiscovery,
    failure_payloads,
    order_srv,
    parse_directory,
    parse_resolver,
    report_failures,
    url_for,
)

NAME = "masters.herder.test"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def dns() -> Iterator[DnsServer]:
    with DnsServer() as server:
        yield server


def disc(dns: DnsServer, **kw: object) -> MasterDiscovery:
    # dns_timeout stays the default (2 s): a loaded machine answers late
    kw.setdefault("directory", False)
    return MasterDiscovery(dns_name=NAME, resolver=dns.address, **kw)  # type: ignore[arg-type]


# ------------------------------------------------------------------ helpers


def test_url_for_brackets_ipv6_and_strips_root_dot() -> None:
    assert url_for("127.0.0.2", 6240) == "http://127.0.0.2:6240"
    assert url_for("::1", 7000) == "http://[::1]:7000"
    assert url_for("fe80::1", 1, "https") == "https://[fe80::1]:1"
    assert url_for("m1.herder.test.", 80) == "http://m1.herder.test:80"


def test_parse_resolver_forms() -> None:
    assert parse_resolver("127.0.0.1:5353") == ("127.0.0.1", 5353)
    assert parse_resolver("[::1]:5353") == ("::1", 5353)
    assert parse_resolver("::1") == ("::1", 53)
    assert parse_resolver("10.0.0.1") == ("10.0.0.1", 53)


def test_order_srv_priority_is_strict() -> None:
    recs = [(20, 1, "c"), (10, 1, "a"), (30, 100, "d"), (10, 1, "b")]
    for seed in range(50):
        out = order_srv(recs, random.Random(seed))
        assert set(out[:2]) == {"a", "b"} and out[2:] == ["c", "d"]


def test_order_srv_weights_bias_the_first_choice() -> None:
    recs = [(10, 90, "heavy"), (10, 10, "light")]
    firsts = Counter(order_srv(recs, random.Random(seed))[0] for seed in range(2000))
    assert 0.85 < firsts["heavy"] / 2000 < 0.95
    # Weight 0 is rarely first, but not never (RFC 2782).
    zero = [(10, 0, "zero"), (10, 50, "w")]
    firsts = Counter(order_srv(zero, random.Random(seed))[0] for seed in range(2000))
    assert 0 < firsts["zero"] < 100


def test_order_srv_equal_weights_shuffle_evenly_and_seed_repeats() -> None:
    recs = [(10, 5, x) for x in "abcd"]
    assert order_srv(recs, random.Random(7)) == order_srv(recs, random.Random(7))
    firsts = Counter(order_srv(recs, random.Random(seed))[0] for seed in range(4000))
    assert set(firsts) == set("abcd")
    assert all(800 < n < 1200 for n in firsts.values())


# -------------------------------------------------------------------- order


def test_candidates_configured_then_dns_without_duplicates(dns: DnsServer) -> None:
    dns.add_a(NAME, "127.0.0.2")
    dns.add_a(NAME, "127.0.0.3")
    d = disc(dns, configured=["127.0.0.9:1", "http://127.0.0.3:6240/api/v1"], srv=False)
    got = d.candidates()
    assert got[:2] == ["http://127.0.0.9:1", "http://127.0.0.3:6240"]
    assert got[2:] == ["http://127.0.0.2:6240"]


def test_configured_only_needs_no_dns() -> None:
    d = MasterDiscovery(["m1:1", "m2:2"], directory=False)
    assert d.candidates() == ["http://m1:1", "http://m2:2"]
    assert d.dns_queries == 0


def test_a_and_aaaa_with_default_port_and_ipv6_brackets(dns: DnsServer) -> None:
    dns.add_a(NAME, "127.0.0.2")
    dns.add_aaaa(NAME, "::1")
    d = disc(dns, srv=False, default_port=7001)
    assert sorted(d.candidates()) == ["http://127.0.0.2:7001", "http://[::1]:7001"]
    assert d.last_dns is not None and d.last_dns.source == "address"


def test_auto_prefers_srv_then_falls_back_to_addresses(dns: DnsServer) -> None:
    dns.add_a(NAME, "127.0.0.2")
    d = disc(dns)
    assert d.candidates() == ["http://127.0.0.2:6240"]  # no SRV records: A
    dns.add_srv(NAME, 10, 1, 7000, "m1.herder.test")
    dns.add_a("m1.herder.test", "127.0.0.5")
    d.invalidate()
    assert d.candidates() == ["http://127.0.0.5:7000"]
    assert d.last_dns is not None and d.last_dns.source == "srv"


def test_srv_priority_then_target_addresses(dns: DnsServer) -> None:
    dns.add_srv(NAME, 20, 1, 7002, "backup.herder.test")
    dns.add_srv(NAME, 10, 1, 7000, "m1.herder.test")
    dns.add_srv(NAME, 10, 1, 7001, "m2.herder.test")
    dns.add_a("m1.herder.test", "127.0.0.2")
    dns.add_a("m2.herder.test", "127.0.0.3")
    dns.add_aaaa("backup.herder.test", "::1")
    d = disc(dns, srv=True, rng=random.Random(3))
    got = d.candidates()
    assert set(got[:2]) == {"http://127.0.0.2:7000", "http://127.0.0.3:7001"}
    assert got[2:] == ["http://[::1]:7002"]


def test_srv_uses_additional_section_glue(dns: DnsServer) -> None:
    dns.glue = True
    dns.add_srv(NAME, 10, 1, 7000, "m1.herder.test")
    dns.add_a("m1.herder.test", "127.0.0.2")
    d = disc(dns, srv=True)
    assert d.candidates() == ["http://127.0.0.2:7000"]
    assert [q for q in dns.queries if q[1] != "SRV"] == []  # no extra A query


def test_srv_target_without_address_keeps_its_name(dns: DnsServer) -> None:
    dns.add_srv(NAME, 10, 1, 7000, "elsewhere.example")
    d = disc(dns, srv=True)
    assert d.candidates() == ["http://elsewhere.example:7000"]
    assert d.last_dns is not None and "elsewhere.example: nxdomain" in d.last_dns.detail


def test_equal_choices_shuffled_with_seed(dns: DnsServer) -> None:
    for i in range(2, 6):
        dns.add_a(NAME, f"127.0.0.{i}")

    def order(seed: int) -> list[str]:
        return disc(dns, srv=False, rng=random.Random(seed)).candidates()

    assert order(11) == order(11)
    firsts = Counter(order(seed)[0] for seed in range(40))
    assert len(firsts) == 4  # agents with different RNGs spread over every master
    assert sorted(order(1)) == [f"http://127.0.0.{i}:6240" for i in range(2, 6)]


# -------------------------------------------------------------------- cache


def test_dns_answer_cached_for_its_ttl(dns: DnsServer) -> None:
    dns.add_a(NAME, "127.0.0.2", ttl=30)
    clock = FakeClock()
    d = disc(dns, srv=False, clock=clock)
    assert d.candidates() == ["http://127.0.0.2:6240"]
    sent = d.dns_queries
    dns.clear(NAME)
    dns.add_a(NAME, "127.0.0.3", ttl=30)
    clock.now += 29
    assert d.candidates() == ["http://127.0.0.2:6240"] and d.dns_queries == sent
    clock.now += 2
    assert d.candidates() == ["http://127.0.0.3:6240"] and d.dns_queries > sent


def test_ttl_is_the_smallest_of_srv_and_targets(dns: DnsServer) -> None:
    dns.add_srv(NAME, 10, 1, 7000, "m1.herder.test", ttl=300)
    dns.add_a("m1.herder.test", "127.0.0.2", ttl=7)
    d = disc(dns, srv=True)
    d.candidates()
    assert d.last_dns is not None and d.last_dns.ttl == 7


def test_failures_cached_for_negative_ttl(dns: DnsServer) -> None:
    dns.set_failure("servfail")
    clock = FakeClock()
    d = disc(dns, clock=clock, negative_ttl=5)
    assert d.candidates() == []
    sent = d.dns_queries
    dns.set_failure(None)
    dns.add_a(NAME, "127.0.0.2")
    clock.now += 4
    assert d.candidates() == [] and d.dns_queries == sent
    clock.now += 2
    assert d.candidates() == ["http://127.0.0.2:6240"]


# ----------------------------------------------------------------- failures


def test_nxdomain_reported(dns: DnsServer) -> None:
    d = disc(dns, configured=["m1:1"])
    assert d.candidates() == ["http://m1:1"]
    assert d.last_dns is not None and d.last_dns.error == DNS_NXDOMAIN
    assert [p.kind for p in d.problems] == [DNS_NXDOMAIN]


def test_no_answer_reported(dns: DnsServer) -> None:
    dns.add(NAME, "TXT", '"hello"')
    d = disc(dns)
    assert d.candidates() == []
    assert d.last_dns is not None and d.last_dns.error == DNS_NO_ANSWER


@pytest.mark.parametrize(("mode", "kind"), [("servfail", DNS_SERVFAIL), ("refused", DNS_REFUSED)])
def test_servfail_and_refused_reported(dns: DnsServer, mode: str, kind: str) -> None:
    dns.set_failure(mode)
    d = disc(dns)
    assert d.candidates() == []
    assert d.last_dns is not None and d.last_dns.error == kind
    assert d.pop_problems()[0].source == "dns" and d.problems == []


def test_timeout_reported_after_one_wait(dns: DnsServer) -> None:
    dns.set_failure("drop")
    d = disc(dns, dns_timeout=0.2)
    assert d.candidates() == []
    assert d.last_dns is not None and d.last_dns.error == DNS_TIMEOUT
    assert len(dns.queries) == 1  # a silent server is not asked A and AAAA too


def test_second_resolver_used_when_first_is_silent(dns: DnsServer) -> None:
    dns.add_a(NAME, "127.0.0.2")
    with DnsServer() as silent:
        silent.set_failure("drop")
        d = MasterDiscovery(
            dns_name=NAME,
            resolver=f"{silent.address} {dns.address}",
            srv=False,
            directory=False,
            dns_timeout=1.0,  # per server: the one that answers must not time out too
        )
        assert d.candidates() == ["http://127.0.0.2:6240"]


def test_unreachable_resolver_is_not_a_crash() -> None:
    d = MasterDiscovery(dns_name=NAME, resolver="127.0.0.1:1", directory=False, dns_timeout=0.2)
    assert d.candidates() == []
    assert d.last_dns is not None and d.last_dns.error is not None


def test_tcp_answers(dns: DnsServer) -> None:
    import dns.message as dm
    import dns.query as dq

    dns.add_a(NAME, "127.0.0.2")
    q = dm.make_query(NAME, "A")
    r = dq.tcp(q, "127.0.0.1", port=dns.port, timeout=2)
    assert [rd.address for rd in r.answer[0]] == ["127.0.0.2"]


# ---------------------------------------------------------------- directory


def _directory_transport(body: object, status: int = 200) -> httpx.MockTransport:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "dead":
            raise httpx.ConnectError("refused", request=request)
        assert request.url.path == "/api/v1/masters"
        return httpx.Response(status, json=body)

    return httpx.MockTransport(handler)


def test_directory_adds_live_masters_after_configured() -> None:
    body = {
        "masters": [
            {"url": "http://m1:1", "id": "a", "state": "up"},
            {"url": "http://m3:3", "id": "c", "role": "read-write"},
            {"url": "http://m4:4", "id": "d", "state": "failed"},
            {"nourl": True},
        ]
    }
    d = MasterDiscovery(["dead:9", "m1:1"], transport=_directory_transport(body))
    assert d.candidates() == ["http://dead:9", "http://m1:1", "http://m3:3"]
    assert d.master_id("http://m3:3") == "c" and d.master_id("http://x:1") is None


def test_directory_404_and_errors_mean_no_directory() -> None:
    d = MasterDiscovery(["m1:1"], transport=_directory_transport({"error": "not_found"}, 404))
    assert d.candidates() == ["http://m1:1"]
    d = MasterDiscovery(["dead:1"], transport=_directory_transport({}))
    assert d.candidates() == ["http://dead:1"]


def test_parse_directory_rejects_non_directory() -> None:
    with pytest.raises(ValueError):
        parse_directory({"jobs": []})
    assert parse_directory({"masters": [{"url": "m:1/api/v1/"}]})[0].url == "http://m:1"


# ------------------------------------------------------------------ backoff


class _MaxRandom(random.Random):
    def uniform(self, a: float, b: float) -> float:
        return b


def test_backoff_ceiling_doubles_to_the_cap() -> None:
    b = Backoff(base=1, cap=30, rng=_MaxRandom())
    assert [b.next() for _ in range(8)] == [1, 2, 4, 8, 16, 30, 30, 30]
    b.reset()
    assert b.next() == 1


def test_backoff_full_jitter_seeded_grows_and_respects_cap() -> None:
    b = Backoff(base=0.5, cap=20, rng=random.Random(42))
    delays = [b.next() for _ in range(12)]
    again = Backoff(base=0.5, cap=20, rng=random.Random(42))
    assert delays == [again.next() for _ in range(12)]  # seeded: repeatable
    ceilings = [min(20, 0.5 * 2**n) for n in range(12)]
    assert all(0 <= d <= c for d, c in zip(delays, ceilings, strict=True))
    # On average the intervals grow: mean of many draws per attempt ≈ ceiling / 2.
    rng = random.Random(7)
    means = []
    for n in range(8):
        draws = []
        for _ in range(400):
            bo = Backoff(base=0.5, cap=20, rng=rng)
            bo.attempt = n
            draws.append(bo.next())
        means.append(sum(draws) / len(draws))
    assert all(later > earlier for earlier, later in itertools.pairwise(means[:7]))
    assert abs(means[7] - 10) < 1.5  # capped at 20: mean ≈ 10


def test_backoff_same_seed_same_delays_and_huge_attempts_stay_capped() -> None:
    a = Backoff(rng=random.Random(5))
    b = Backoff(rng=random.Random(5))
    assert [a.next() for _ in range(6)] == [b.next() for _ in range(6)]
    assert Backoff(base=1, cap=60).ceiling(10_000) == 60


def test_backoff_rejects_bad_parameters() -> None:
    with pytest.raises(ValueError):
        Backoff(base=0)
    with pytest.raises(ValueError):
        Backoff(factor=0.5)


# ------------------------------------------------------- failure reporting


def test_failure_payloads() -> None:
    fs = [
        MasterFailure("http://m1:1", 0.0, "unreachable", "GET /api/v1/jobs"),
        MasterFailure("http://m2:2", 1.5, "busy", "POST /api/v1/agents/a/claim"),
    ]
    out = failure_payloads(
        fs, reporter="agent-7", master_ids={"http://m2:2": "m2"}.get, exclude=["http://m1:1"]
    )
    assert out == [
        (
            "/masters/m2/failures",
            {
                "time": "1970-01-01T00:00:01.500000Z",
                "reporter": "agent-7",
                "request": "POST /api/v1/agents/a/claim",
                "kind": "busy",
                "url": "http://m2:2",
            },
        )
    ]
    ((path, _),) = failure_payloads(fs[:1])
    assert path == "/masters/m1:1/failures"


def _farm(status_of_report: int, seen: list[tuple[str, dict[str, object]]]) -> httpx.MockTransport:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "dead":
            raise httpx.ConnectError("refused", request=request)
        if request.url.path.endswith("/failures"):
            seen.append((request.url.path, json.loads(request.content)))
            if status_of_report == 404:
                return httpx.Response(404, json={"error": "not_found", "message": "Not Found"})
            return httpx.Response(status_of_report)
        return httpx.Response(200, json={"status": "ok"})

    return httpx.MockTransport(handler)


def test_report_failures_posts_to_the_master_that_answered() -> None:
    seen: list[tuple[str, dict[str, object]]] = []
    with HerderClient(["dead:1", "live:2"], transport=_farm(204, seen)) as c:
        c.health()
        assert c.preferred == "http://live:2"
        report = report_failures(c, reporter="tester")
        assert (report.sent, report.unsupported) == (1, False)
        assert c.failures == []
    path, body = seen[0]
    assert path == "/api/v1/masters/dead:1/failures"
    assert body["url"] == "http://dead:1" and body["request"] == "GET /api/v1/health"
    assert body["reporter"] == "tester" and body["kind"] == "unreachable"


def test_report_failures_ignores_404() -> None:
    seen: list[tuple[str, dict[str, object]]] = []
    with HerderClient(["dead:1", "dead:3", "live:2"], transport=_farm(404, seen)) as c:
        c.health()
        report = report_failures(c)
    assert report.unsupported and report.sent == 0 and len(seen) == 1


# ------------------------------------------------------ HerderClient hookup


def test_client_takes_masters_from_discovery_at_request_time() -> None:
    class Source:
        urls = ["dead:1"]

        def candidates(self) -> list[str]:
            return list(self.urls)

    src = Source()
    with HerderClient(discovery=src, transport=_farm(204, [])) as c:
        with pytest.raises(NoMasterAvailable, match="dead"):
            c.health()
        src.urls = ["dead:1", "live:2"]
        assert c.health() == {"status": "ok"}
        assert c.masters == ["http://dead:1", "http://live:2"]
        assert [f.url for f in c.failures] == ["http://dead:1"] * 2


def test_client_needs_masters_or_discovery() -> None:
    with pytest.raises(ValueError):
        HerderClient()
    with (
        HerderClient(discovery=MasterDiscovery(directory=False)) as c,
        pytest.raises(NoMasterAvailable, match="GET"),
    ):
        c.health()


def test_directory_asks_at_most_directory_tries_masters() -> None:
    asked: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        asked.append(request.url.host)
        raise httpx.ConnectTimeout("black hole", request=request)

    d = MasterDiscovery(["a:1", "b:1", "c:1"], transport=httpx.MockTransport(handler))
    assert d.candidates() == ["http://a:1", "http://b:1", "http://c:1"]
    assert asked == ["a", "b"]
    d.candidates()
    assert asked == ["a", "b"]  # cached for directory_ttl
