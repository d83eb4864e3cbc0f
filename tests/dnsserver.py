"""A tiny authoritative DNS server for tests (UDP and TCP on one loopback port).

Built on dnspython's message API. Serves A, AAAA and SRV records with TTLs;
can answer SERVFAIL/REFUSED or drop queries (to test timeouts), per name or
for every name::

    with DnsServer() as dns:
        dns.add_a("masters.herder.test", "127.0.0.2", ttl=30)
        dns.add_srv("masters.herder.test", 10, 5, 6240, "m1.herder.test")
        dns.address   # "127.0.0.1:<port>", for MasterDiscovery(resolver=...)
        dns.set_failure("servfail")          # every name
        dns.set_failure("drop", "x.test")    # one name
        dns.set_failure(None)                # back to normal

Unknown names get NXDOMAIN; a known name without records of the type asked
gets an empty NOERROR answer. Records of SRV targets are added to the
additional section only when ``glue=True``.
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import threading
from collections import defaultdict
from dataclasses import dataclass

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

FAILURES = ("servfail", "refused", "drop")


@dataclass(frozen=True)
class _Record:
    rdtype: dns.rdatatype.RdataType
    ttl: int
    text: str


class DnsServer:
    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, tcp: bool = True) -> None:
        self.host = host
        self._want_port = port
        self.tcp = tcp
        self.glue = False
        self._records: dict[dns.name.Name, list[_Record]] = defaultdict(list)
        self._fail_all: str | None = None
        self._fail: dict[dns.name.Name, str] = {}
        self._lock = threading.Lock()
        self.queries: list[tuple[str, str]] = []  # (name, type) of each query received
        self._udp: socket.socket | None = None
        self._tcp: socket.socket | None = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.port = 0

    # ------------------------------------------------------------ records

    @staticmethod
    def _name(name: str) -> dns.name.Name:
        return dns.name.from_text(name)

    def add(self, name: str, rdtype: str, text: str, ttl: int = 60) -> None:
        with self._lock:
            self._records[self._name(name)].append(
                _Record(dns.rdatatype.from_text(rdtype), int(ttl), text)
            )

    def add_a(self, name: str, address: str, ttl: int = 60) -> None:
        self.add(name, "A", address, ttl)

    def add_aaaa(self, name: str, address: str, ttl: int = 60) -> None:
        self.add(name, "AAAA", address, ttl)

    def add_srv(
        self,
        name: str,
        priority: int,
        weight: int,
        port: int,
        target: str,
        ttl: int = 60,
        *,
        service: str = "_herder._tcp",
    ) -> None:
        """An SRV record of ``<service>.<name>`` (target made absolute)."""
        target = target if target.endswith(".") else target + "."
        self.add(f"{service}.{name}", "SRV", f"{priority} {weight} {port} {target}", ttl)

    def clear(self, name: str | None = None) -> None:
        with self._lock:
            if name is None:
                self._records.clear()
            else:
                self._records.pop(self._name(name), None)

    def set_failure(self, mode: str | None, name: str | None = None) -> None:
        """``"servfail"``, ``"refused"``, ``"drop"`` or ``None``, for one name or all."""
        if mode is not None and mode not in FAILURES:
            raise ValueError(f"unknown failure mode {mode!r}")
        with self._lock:
            if name is None:
                self._fail_all = mode
                if mode is None:
                    self._fail.clear()
            elif mode is None:
                self._fail.pop(self._name(name), None)
            else:
                self._fail[self._name(name)] = mode

    # ------------------------------------------------------------ answers

    def answer(self, wire: bytes) -> bytes | None:
        """The wire answer to a query (None: drop it)."""
        try:
            query = dns.message.from_wire(wire)
        except Exception:
            return None
        if not query.question:
            return None
        q = query.question[0]
        with self._lock:
            self.queries.append((q.name.to_text(), dns.rdatatype.to_text(q.rdtype)))
            mode = self._fail.get(q.name, self._fail_all)
            records = list(self._records.get(q.name, []))
            known = q.name in self._records
            glue = {n: list(r) for n, r in self._records.items()} if self.glue else {}
        if mode == "drop":
            return None
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if mode == "servfail":
            response.set_rcode(dns.rcode.SERVFAIL)
            return response.to_wire()
        if mode == "refused":
            response.set_rcode(dns.rcode.REFUSED)
            return response.to_wire()
        if not known:
            response.set_rcode(dns.rcode.NXDOMAIN)
            return response.to_wire()
        matching = [r for r in records if r.rdtype == q.rdtype]
        if matching:
            ttl = min(r.ttl for r in matching)
            rrset = dns.rrset.from_text_list(
                q.name, ttl, dns.rdataclass.IN, q.rdtype, [r.text for r in matching]
            )
            response.answer.append(rrset)
            if q.rdtype == dns.rdatatype.SRV and glue:
                for rd in rrset:
                    for rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
                        extra = [r for r in glue.get(rd.target, []) if r.rdtype == rdtype]
                        if extra:
                            response.additional.append(
                                dns.rrset.from_text_list(
                                    rd.target,
                                    min(r.ttl for r in extra),
                                    dns.rdataclass.IN,
                                    rdtype,
                                    [r.text for r in extra],
                                )
                            )
        return response.to_wire()

    # ------------------------------------------------------------ serving

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def start(self) -> DnsServer:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        for _ in range(20):
            udp = socket.socket(family, socket.SOCK_DGRAM)
            udp.bind((self.host, self._want_port))
            port = int(udp.getsockname()[1])
            if not self.tcp:
                break
            tcp = socket.socket(family, socket.SOCK_STREAM)
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                tcp.bind((self.host, port))
            except OSError:
                udp.close()
                tcp.close()
                if self._want_port:
                    raise
                continue
            tcp.listen(16)
            self._tcp = tcp
            break
        else:
            raise RuntimeError("no free port for UDP and TCP")
        self._udp = udp
        self.port = port
        self._stop.clear()
        self._threads = [threading.Thread(target=self._serve_udp, name="dns-udp", daemon=True)]
        if self._tcp is not None:
            self._threads.append(
                threading.Thread(target=self._serve_tcp, name="dns-tcp", daemon=True)
            )
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(5)
        self._threads = []
        for s in (self._udp, self._tcp):
            if s is not None:
                s.close()
        self._udp = self._tcp = None

    def __enter__(self) -> DnsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _serve_udp(self) -> None:
        assert self._udp is not None
        sock = self._udp
        while not self._stop.is_set():
            ready, _, _ = select.select([sock], [], [], 0.1)
            if not ready:
                continue
            try:
                wire, peer = sock.recvfrom(65535)
            except OSError:
                continue
            out = self.answer(wire)
            if out is not None:
                with contextlib.suppress(OSError):
                    sock.sendto(out, peer)

    def _serve_tcp(self) -> None:
        assert self._tcp is not None
        sock = self._tcp
        while not self._stop.is_set():
            ready, _, _ = select.select([sock], [], [], 0.1)
            if not ready:
                continue
            try:
                conn, _ = sock.accept()
            except OSError:
                continue
            threading.Thread(target=self._serve_conn, args=(conn,), daemon=True).start()

    def _serve_conn(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(5)
            try:
                while not self._stop.is_set():
                    head = _recv_exact(conn, 2)
                    if head is None:
                        return
                    (length,) = struct.unpack("!H", head)
                    wire = _recv_exact(conn, length)
                    if wire is None:
                        return
                    out = self.answer(wire)
                    if out is None:
                        return
                    conn.sendall(struct.pack("!H", len(out)) + out)
            except OSError:
                return


def _recv_exact(conn: socket.socket, n: int) -> bytes | None:
    buf = b""
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf
