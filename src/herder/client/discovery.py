"""Finding masters (DESIGN §6; seeds/000, seeds/001), shared by agents and clients.

:class:`MasterDiscovery` answers "which masters, in what order?":

1. the configured list, as given;
2. a DNS alias, resolved with dnspython against a configurable resolver
   (``host:port``): the SRV records ``_herder._tcp.<name>`` (RFC 2782: lowest
   priority first, weighted random order within a priority), or else the
   A/AAAA records of the name itself with ``default_port``. Equal choices are
   shuffled (a seedable RNG) so agents spread over masters. Answers are cached
   for their TTL; failures (timeout, NXDOMAIN, SERVFAIL, …) are reported in
   :attr:`MasterDiscovery.last_dns` and :attr:`MasterDiscovery.problems`,
   never raised;
3. the directory (``GET /api/v1/masters``) of the first master that answers
   it; a 404 or a connection error means "no directory".

:class:`Backoff` is the capped binary exponential backoff with full jitter
used when every master failed. :func:`failure_payloads` and
:func:`report_failures` turn a :class:`HerderClient`'s recorded failures into
``POST /api/v1/masters/{id}/failures`` requests.
"""

from __future__ import annotations

import ipaddress
import logging
import random
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.resolver
import dns.rrset
import httpx

from herder.client.backoff import Backoff as Backoff
from herder.client.core import API_PREFIX, normalize_master_url

log = logging.getLogger(__name__)

DEFAULT_PORT = 6240
SRV_SERVICE = "_herder._tcp"
DIRECTORY_PATH = f"{API_PREFIX}/masters"
#: Directory states that mean "do not send work there".
DOWN_STATES = frozenset({"failed", "down", "dead", "stopped", "offline", "unreachable"})

# DNS failure kinds (DnsResult.error / DiscoveryProblem.kind).
DNS_TIMEOUT = "timeout"
DNS_NXDOMAIN = "nxdomain"
DNS_SERVFAIL = "servfail"
DNS_REFUSED = "refused"
DNS_NO_ANSWER = "no_answer"  # the name exists but has no records of the type asked
DNS_NO_RESOLVER = "no_resolver"
DNS_ERROR = "error"  # anything else: a bad answer, a network error, another rcode


# ----------------------------------------------------------------- results


@dataclass(frozen=True)
class DnsResult:
    """The outcome of resolving the DNS alias: URLs in order, or why there are none."""

    name: str
    urls: tuple[str, ...] = ()
    source: str | None = None  # "srv" | "address" | None
    ttl: float = 0.0
    error: str | None = None  # one of the DNS_* kinds
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class DirectoryEntry:
    url: str
    id: str | None = None
    state: str | None = None
    role: str | None = None


@dataclass(frozen=True)
class DiscoveryProblem:
    """Something that went wrong while looking for masters (reported, never raised)."""

    source: str  # "dns" | "directory"
    kind: str
    detail: str
    when: float


class DnsError(Exception):
    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


@dataclass
class _Answer:
    rrsets: list[dns.rrset.RRset]
    additional: list[dns.rrset.RRset]

    def ttl(self) -> float | None:
        ttls = [r.ttl for r in self.rrsets]
        return float(min(ttls)) if ttls else None


@dataclass
class _Cached:
    expires: float
    value: Any = None
    extra: list[DirectoryEntry] = field(default_factory=list)


# ----------------------------------------------------------------- helpers


def parse_resolver(resolver: str) -> tuple[str, int]:
    """``"127.0.0.1:5353"``, ``"[::1]:5353"``, ``"::1"`` or ``"10.0.0.1"`` → (address, port)."""
    resolver = resolver.strip()
    if resolver.startswith("["):
        host, _, rest = resolver[1:].partition("]")
        port = int(rest[1:]) if rest.startswith(":") else 53
        return host, port
    if resolver.count(":") == 1:
        host, _, port_s = resolver.partition(":")
        return host, int(port_s)
    return resolver, 53


def url_for(host: str, port: int, scheme: str = "http") -> str:
    """A master base URL; IPv6 addresses are bracketed."""
    host = host.rstrip(".")
    try:
        if ipaddress.ip_address(host).version == 6:
            host = f"[{host}]"
    except ValueError:
        pass
    return f"{scheme}://{host}:{int(port)}"


def order_srv(records: Sequence[tuple[int, int, Any]], rng: random.Random) -> list[Any]:
    """RFC 2782 order: ascending priority; within one, weighted random selection.

    ``records`` are ``(priority, weight, item)``. Weight-0 records keep a small
    chance of being chosen first (they are placed first in the running sum, as
    the RFC says). Equal weights make this a uniform shuffle.
    """
    out: list[Any] = []
    for prio in sorted({p for p, _, _ in records}):
        # Sorted first: servers rotate answers, only the RNG decides the order.
        group = sorted((w, item) for p, w, item in records if p == prio)
        # Zero weights first, the rest in random order (RFC 2782).
        rng.shuffle(group)
        group.sort(key=lambda g: g[0] != 0)
        while group:
            total = sum(w for w, _ in group)
            pick = rng.randint(0, total) if total > 0 else 0
            running = 0
            for i, (w, item) in enumerate(group):
                running += w
                if running >= pick:
                    out.append(item)
                    del group[i]
                    break
    return out


# ---------------------------------------------------------------- discovery


class MasterDiscovery:
    """Master URLs from a configured list, a DNS alias and the master directory.

    ``srv``: ``None`` (auto) tries SRV ``_herder._tcp.<name>`` and falls back
    to A/AAAA of ``<name>``; ``True`` only SRV; ``False`` only A/AAAA.
    ``resolver``: ``"host:port"`` of the DNS server to ask (default: the
    system's, from /etc/resolv.conf). ``rng`` seeds the shuffling of equal
    choices; ``clock`` (monotonic seconds) drives the caches.
    """

    def __init__(
        self,
        configured: Iterable[str] | str = (),
        dns_name: str | None = None,
        resolver: str | None = None,
        srv: bool | None = None,
        scheme: str = "http",
        default_port: int = DEFAULT_PORT,
        directory: bool = True,
        *,
        dns_timeout: float = 2.0,
        negative_ttl: float = 5.0,
        directory_ttl: float = 10.0,
        directory_tries: int = 2,
        http_timeout: float = 2.0,
        transport: httpx.BaseTransport | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        items = configured.replace(",", " ").split() if isinstance(configured, str) else configured
        self.configured: list[str] = []
        for item in items:
            url = normalize_master_url(item)
            if url not in self.configured:
                self.configured.append(url)
        self.dns_name = dns_name.rstrip(".") if dns_name else None
        self.resolver = resolver
        self.srv = srv
        self.scheme = scheme
        self.default_port = int(default_port)
        self.directory = directory
        self.dns_timeout = float(dns_timeout)
        self.negative_ttl = float(negative_ttl)
        self.directory_ttl = float(directory_ttl)
        # Masters asked for the directory per refresh (a black-holed one costs http_timeout).
        self.directory_tries = max(1, int(directory_tries))
        self._rng = rng if rng is not None else random.Random()
        self._clock = clock
        self._lock = threading.RLock()
        self._dns_cache: _Cached | None = None
        self._dir_cache: _Cached | None = None
        self._problems: list[DiscoveryProblem] = []
        self.last_dns: DnsResult | None = None
        self.dns_queries = 0  # queries sent (tests check the cache with it)
        self._http: httpx.Client | None = None
        self._http_timeout = float(http_timeout)
        self._transport = transport

    # ------------------------------------------------------------ public

    def candidates(self) -> list[str]:
        """Master URLs in order: configured, then DNS, then the directory (no duplicates)."""
        out = list(self.configured)
        if self.dns_name:
            for url in self.resolve().urls:
                if url not in out:
                    out.append(url)
        if self.directory and out:
            for entry in self.directory_entries(out):
                if entry.url not in out and (entry.state or "").lower() not in DOWN_STATES:
                    out.append(entry.url)
        return out

    def resolve(self) -> DnsResult:
        """The DNS alias's master URLs (cached for the answer's TTL)."""
        if not self.dns_name:
            return DnsResult(name="", error=DNS_NO_ANSWER, detail="no DNS name configured")
        with self._lock:
            now = self._clock()
            if self._dns_cache is not None and now < self._dns_cache.expires:
                cached: DnsResult = self._dns_cache.value
                return cached
            result = self._resolve_uncached()
            ttl = result.ttl if result.ok else self.negative_ttl
            self._dns_cache = _Cached(expires=now + ttl, value=result)
            self.last_dns = result
            if not result.ok:
                self._problem("dns", result.error or DNS_ERROR, result.detail)
            return result

    def directory_entries(self, reachable: Sequence[str]) -> list[DirectoryEntry]:
        """The directory of the first of ``reachable`` that answers (cached ``directory_ttl``)."""
        with self._lock:
            now = self._clock()
            if self._dir_cache is not None and now < self._dir_cache.expires:
                return list(self._dir_cache.extra)
            entries = self._fetch_directory(reachable)
            self._dir_cache = _Cached(expires=now + self.directory_ttl, extra=entries)
            return list(entries)

    def invalidate(self) -> None:
        """Forget cached DNS and directory answers (e.g. after every master failed)."""
        with self._lock:
            self._dns_cache = None
            self._dir_cache = None

    @property
    def problems(self) -> list[DiscoveryProblem]:
        with self._lock:
            return list(self._problems)

    def pop_problems(self) -> list[DiscoveryProblem]:
        with self._lock:
            out, self._problems = self._problems, []
            return out

    def master_id(self, url: str) -> str | None:
        """The directory id of a master URL, when the directory named it."""
        with self._lock:
            entries = self._dir_cache.extra if self._dir_cache is not None else []
        for e in entries:
            if e.url == url:
                return e.id
        return None

    def close(self) -> None:
        if self._http is not None:
            self._http.close()
            self._http = None

    def __enter__(self) -> MasterDiscovery:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------- DNS

    def _problem(self, source: str, kind: str, detail: str) -> None:
        log.warning("master discovery: %s %s: %s", source, kind, detail)
        self._problems.append(DiscoveryProblem(source, kind, detail, time.time()))
        del self._problems[:-100]

    def _nameservers(self) -> list[tuple[str, int]]:
        if self.resolver:
            return [parse_resolver(r) for r in self.resolver.replace(",", " ").split()]
        try:
            system = dns.resolver.Resolver()
        except (dns.resolver.NoResolverConfiguration, OSError) as exc:
            raise DnsError(DNS_NO_RESOLVER, f"no system resolver: {exc}") from exc
        servers = [str(ns) for ns in system.nameservers]
        if not servers:
            raise DnsError(DNS_NO_RESOLVER, "no system resolver configured")
        return [(ns, int(system.port)) for ns in servers]

    def _query(self, name: str, rdtype: dns.rdatatype.RdataType) -> _Answer:
        """One query, tried on each name server until one gives a definite answer."""
        qname = dns.name.from_text(name)
        last: DnsError | None = None
        for host, port in self._nameservers():
            query = dns.message.make_query(qname, rdtype)
            query.flags |= dns.flags.RD
            self.dns_queries += 1
            try:
                response, _ = dns.query.udp_with_fallback(
                    query, host, timeout=self.dns_timeout, port=port
                )
            except dns.exception.Timeout:
                last = DnsError(DNS_TIMEOUT, f"{name} {rdtype.name}: no answer from {host}:{port}")
                continue
            except (OSError, dns.exception.DNSException, ValueError) as exc:
                last = DnsError(
                    DNS_ERROR,
                    f"{name} {rdtype.name} via {host}:{port}: {type(exc).__name__}: {exc}",
                )
                continue
            rcode = response.rcode()
            if rcode == dns.rcode.NXDOMAIN:
                raise DnsError(DNS_NXDOMAIN, f"{name}: no such name ({host}:{port})")
            if rcode == dns.rcode.SERVFAIL:
                last = DnsError(DNS_SERVFAIL, f"{name} {rdtype.name}: SERVFAIL from {host}:{port}")
                continue
            if rcode == dns.rcode.REFUSED:
                last = DnsError(DNS_REFUSED, f"{name} {rdtype.name}: REFUSED by {host}:{port}")
                continue
            if rcode != dns.rcode.NOERROR:
                last = DnsError(
                    DNS_ERROR,
                    f"{name} {rdtype.name}: {dns.rcode.to_text(rcode)} from {host}:{port}",
                )
                continue
            rrsets = [
                r for r in response.answer if r.rdtype == rdtype and r.rdclass == dns.rdataclass.IN
            ]
            if not rrsets:
                raise DnsError(DNS_NO_ANSWER, f"{name}: no {rdtype.name} records")
            return _Answer(rrsets, list(response.additional))
        assert last is not None
        raise last

    def _addresses(
        self, name: str, additional: Sequence[dns.rrset.RRset] = ()
    ) -> tuple[list[str], float | None, DnsError | None]:
        """A and AAAA addresses of ``name`` (from ``additional`` when it has them)."""
        qname = dns.name.from_text(name)
        addrs: list[str] = []
        ttls: list[float] = []
        from_additional = [
            r
            for r in additional
            if r.name == qname and r.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA)
        ]
        if from_additional:
            for r in from_additional:
                addrs.extend(rd.address for rd in r)
                ttls.append(float(r.ttl))
            return addrs, min(ttls), None
        errors: list[DnsError] = []
        for rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
            try:
                answer = self._query(name, rdtype)
            except DnsError as exc:
                errors.append(exc)
                if exc.kind == DNS_TIMEOUT:
                    break  # the server is not answering; do not wait twice
                continue
            for r in answer.rrsets:
                addrs.extend(rd.address for rd in r)
            ttl = answer.ttl()
            if ttl is not None:
                ttls.append(ttl)
        if addrs:
            return addrs, (min(ttls) if ttls else None), None
        # No address: the most telling error (NXDOMAIN < no answer < the rest).
        worst = next(
            (e for e in errors if e.kind not in (DNS_NXDOMAIN, DNS_NO_ANSWER)),
            next((e for e in errors if e.kind == DNS_NXDOMAIN), errors[0] if errors else None),
        )
        return [], None, worst

    def _resolve_uncached(self) -> DnsResult:
        name = self.dns_name
        assert name is not None
        srv_error: DnsError | None = None
        if self.srv is not False:
            try:
                result = self._resolve_srv(name)
                if result.urls or self.srv:
                    return result
            except DnsError as exc:
                if self.srv or exc.kind in (DNS_TIMEOUT, DNS_NO_RESOLVER):
                    return DnsResult(name=name, error=exc.kind, detail=exc.detail)
                srv_error = exc
        addrs, ttl, err = self._addresses(name)
        if not addrs:
            assert err is not None
            detail = err.detail
            if srv_error is not None:
                detail = f"{detail}; SRV {SRV_SERVICE}.{name}: {srv_error.kind}"
            return DnsResult(name=name, error=err.kind, detail=detail)
        addrs = sorted(set(addrs))  # servers rotate answers: only our RNG decides the order
        self._rng.shuffle(addrs)
        urls = _dedup(url_for(a, self.default_port, self.scheme) for a in addrs)
        return DnsResult(name=name, urls=tuple(urls), source="address", ttl=ttl or 0.0)

    def _resolve_srv(self, name: str) -> DnsResult:
        srv_name = f"{SRV_SERVICE}.{name}"
        answer = self._query(srv_name, dns.rdatatype.SRV)
        ttls = [answer.ttl() or 0.0]
        records: list[tuple[int, int, tuple[str, int]]] = []
        for rrset in answer.rrsets:
            for rd in rrset:
                target = rd.target.to_text()
                if target == ".":
                    continue  # "service decidedly not available" (RFC 2782)
                records.append((int(rd.priority), int(rd.weight), (target, int(rd.port))))
        urls: list[str] = []
        problems: list[str] = []
        for target, port in order_srv(records, self._rng):
            host = target.rstrip(".")
            try:
                ipaddress.ip_address(host)
                addrs: list[str] = [host]
            except ValueError:
                addrs, ttl, err = self._addresses(target, answer.additional)
                if err is not None:
                    problems.append(f"{host}: {err.kind}")
                if ttl is not None:
                    ttls.append(ttl)
                if not addrs:
                    addrs = [host]  # let the system resolve it when connecting
            urls.extend(url_for(a, port, self.scheme) for a in addrs)
        detail = "; ".join(problems)
        if not urls:
            return DnsResult(
                name=name,
                source="srv",
                error=DNS_NO_ANSWER,
                detail=f"{srv_name}: no usable targets",
            )
        return DnsResult(
            name=name, urls=tuple(_dedup(urls)), source="srv", ttl=min(ttls), detail=detail
        )

    # -------------------------------------------------------- directory

    def _client(self) -> httpx.Client:
        if self._http is None:
            from herder.tlsconf import client_verify

            self._http = httpx.Client(
                transport=self._transport,
                timeout=self._http_timeout,
                trust_env=False,
                verify=client_verify(True),  # --ca / $HERDER_CA, as the request loop
                headers={"accept": "application/json"},
            )
        return self._http

    def _fetch_directory(self, reachable: Sequence[str]) -> list[DirectoryEntry]:
        for base in list(reachable)[: self.directory_tries]:
            try:
                response = self._client().get(base + DIRECTORY_PATH)
            except httpx.HTTPError as exc:
                log.debug("directory of %s: %s", base, exc)
                continue
            if response.status_code == 404:
                return []  # this farm has no directory
            if response.status_code != 200:
                continue
            try:
                return parse_directory(response.json())
            except ValueError as exc:
                self._problem("directory", "malformed", f"{base}: {exc}")
                continue
        return []


def parse_directory(body: Any) -> list[DirectoryEntry]:
    """``{"masters": [{"url", "id"?, "state"?, "role"?}, …]}`` → entries (bad items skipped)."""
    if not isinstance(body, dict) or not isinstance(body.get("masters"), list):
        raise ValueError("not a master directory")
    out: list[DirectoryEntry] = []
    for item in body["masters"]:
        if not isinstance(item, dict) or not isinstance(item.get("url"), str):
            continue
        try:
            url = normalize_master_url(item["url"])
        except ValueError:
            continue
        ident = item.get("id")
        state = item.get("state")
        role = item.get("role")
        out.append(
            DirectoryEntry(
                url=url,
                id=str(ident) if ident is not None else None,
                state=state if isinstance(state, str) else None,
                role=role if isinstance(role, str) else None,
            )
        )
    return out


def _dedup(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


# Failure reporting (DESIGN §6) lives in herder.client.failures; these names
# stay importable from here.
from herder.client.failures import FailureReport as FailureReport  # noqa: E402
from herder.client.failures import default_reporter as default_reporter  # noqa: E402
from herder.client.failures import failure_payloads as failure_payloads  # noqa: E402
from herder.client.failures import report_failures as report_failures  # noqa: E402
