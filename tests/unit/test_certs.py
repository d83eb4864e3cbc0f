"""`herder certs init` (herder.certs): the CA and server certificate it makes, its files'
permissions, and that it never overwrites what exists without --force."""

from __future__ import annotations

import datetime as dt
import ipaddress
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from herder.certs import FILES, CertError, init_certs, parse_hosts
from herder.cli import app
from herder.tlsconf import client_context, server_context


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _sans(path: Path) -> tuple[list[str], list[str]]:
    ext = _cert(path).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return ext.get_values_for_type(x509.DNSName), [
        str(ip) for ip in ext.get_values_for_type(x509.IPAddress)
    ]


def _handshake(d: Path, server_name: str, ca: Path) -> None:
    """A real TLS handshake over a socket pair: the server serves server.crt, the client
    verifies it against ``ca`` for ``server_name``; raises what the client raises."""
    srv_ctx = server_context(d / "server.crt", d / "server.key")
    a, b = socket.socketpair()
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            with srv_ctx.wrap_socket(a, server_side=True) as s:
                s.sendall(b"ok")
        except (OSError, ssl.SSLError) as exc:
            errors.append(exc)

    t = threading.Thread(target=serve)
    t.start()
    try:
        with client_context(ca).wrap_socket(b, server_hostname=server_name) as c:
            assert c.recv(2) == b"ok"
    finally:
        b.close()
        t.join(10)
        a.close()


def test_sans_name_loopback_and_every_host(tmp_path: Path) -> None:
    issued = init_certs(tmp_path / "farm", ["render01.example", "10.1.2.3", "[fd00::7]", "Farm."])
    dns, ips = _sans(issued.server_cert)
    assert dns == ["localhost", "render01.example", "farm"]
    assert ips == ["127.0.0.1", "::1", "10.1.2.3", "fd00::7"]
    assert issued.dns_names == tuple(dns) and issued.ip_addresses == tuple(ips)
    server = _cert(issued.server_cert)
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    ca = _cert(issued.ca_cert)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert server.issuer == ca.subject


@pytest.mark.parametrize("name", ["localhost", "127.0.0.1", "::1", "render01.example"])
def test_the_certificate_verifies_against_its_ca_for_each_name(tmp_path: Path, name: str) -> None:
    d = tmp_path / "farm"
    init_certs(d, ["render01.example"])
    _handshake(d, name, d / "ca.crt")


def test_a_name_not_in_the_certificate_or_another_ca_is_refused(tmp_path: Path) -> None:
    d, other = tmp_path / "farm", tmp_path / "other"
    init_certs(d)
    init_certs(other)
    with pytest.raises(ssl.SSLCertVerificationError, match=r"match|mismatch"):
        _handshake(d, "render99.example", d / "ca.crt")
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(d, "localhost", other / "ca.crt")


def test_days_bound_both_certificates(tmp_path: Path) -> None:
    now = dt.datetime(2030, 1, 15, 12, 0, tzinfo=dt.UTC)
    issued = init_certs(tmp_path / "d", days=30, now=now)
    for path in (issued.ca_cert, issued.server_cert):
        cert = _cert(path)
        assert cert.not_valid_after_utc == now + dt.timedelta(days=30)
        # a few minutes back: a machine whose clock is slow still accepts it
        assert now - dt.timedelta(minutes=10) < cert.not_valid_before_utc < now
    assert issued.not_after == now + dt.timedelta(days=30)


def test_an_expired_certificate_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "old"
    init_certs(d, days=1, now=dt.datetime.now(dt.UTC) - dt.timedelta(days=3))
    with pytest.raises(ssl.SSLCertVerificationError, match="expired"):
        _handshake(d, "localhost", d / "ca.crt")


def test_keys_are_private_and_certificates_public(tmp_path: Path) -> None:
    issued = init_certs(tmp_path / "d")
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in issued.directory.iterdir()}
    assert modes == {"ca.key": 0o600, "server.key": 0o600, "ca.crt": 0o644, "server.crt": 0o644}


def test_nothing_is_overwritten_without_force(tmp_path: Path) -> None:
    d = tmp_path / "d"
    init_certs(d)
    before = {name: (d / name).read_bytes() for name in FILES}
    with pytest.raises(CertError, match=r"ca\.crt exists: nothing written \(--force"):
        init_certs(d)
    assert {name: (d / name).read_bytes() for name in FILES} == before
    init_certs(d, force=True)
    after = {name: (d / name).read_bytes() for name in FILES}
    assert all(after[name] != before[name] for name in FILES)
    assert sorted(p.name for p in d.iterdir()) == sorted(FILES)  # no temporary file left


def test_one_file_in_the_way_stops_everything(tmp_path: Path) -> None:
    d = tmp_path / "d"
    d.mkdir()
    (d / "server.key").write_text("mine")
    with pytest.raises(CertError, match=r"server\.key exists"):
        init_certs(d)
    assert [p.name for p in d.iterdir()] == ["server.key"]
    assert (d / "server.key").read_text() == "mine"


@pytest.mark.parametrize(
    ("hosts", "days", "message"),
    [
        (["bad name"], 365, "not a host name"),
        (["-lead.example"], 365, "not a host name"),
        ([""], 365, "empty"),
        ([], 0, "--days 0"),
        ([], 10**9, "--days"),
    ],
)
def test_bad_input_is_a_one_line_error_and_writes_nothing(
    tmp_path: Path, hosts: list[str], days: int, message: str
) -> None:
    with pytest.raises(CertError, match=message) as info:
        init_certs(tmp_path / "d", hosts, days=days)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "d").exists()


def test_parse_hosts_dedups_and_keeps_idna() -> None:
    names, ips = parse_hosts(["localhost", "127.0.0.1", "bücher.example", "*.farm.example"])
    assert names == ["localhost", "xn--bcher-kva.example", "*.farm.example"]
    assert ips == [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")]


def test_cli_init_then_refuse(tmp_path: Path) -> None:
    runner = CliRunner()
    d = tmp_path / "certs"
    r = runner.invoke(app, ["certs", "init", str(d), "--host", "m1.example", "--days", "10"])
    assert r.exit_code == 0, r.output
    assert "m1.example" in r.output and str(d / "ca.crt") in r.output
    again = runner.invoke(app, ["certs", "init", str(d)])
    assert again.exit_code == 1
    assert again.output.strip().splitlines() == [
        f"error: {d / 'ca.crt'} exists: nothing written (--force replaces the files)"
    ]
    forced = runner.invoke(app, ["certs", "init", str(d), "--force"])
    assert forced.exit_code == 0, forced.output
    file_in_the_way = tmp_path / "plain"
    file_in_the_way.write_text("x")
    r = runner.invoke(app, ["certs", "init", str(file_in_the_way)])
    assert r.exit_code == 1 and "is not a directory" in r.output and "Traceback" not in r.output
