"""A farm's certificate authority and server certificate (``herder certs init``; DESIGN §11).

:func:`init_certs` writes into one directory:

==============  ======  ===================================================
``ca.crt``      0644    the farm CA: give it to clients and agents (``--ca``)
``ca.key``      0600    its key: only needed to issue more certificates
``server.crt``  0644    a server certificate signed by the CA (leaf, then CA)
``server.key``  0600    its key
==============  ======  ===================================================

The server certificate names ``localhost``, ``127.0.0.1``, ``::1`` and every
``--host`` (an address becomes an IP SAN, anything else a DNS name), so one
certificate serves a master, an agent's talkback endpoint and its direct
listener on the hosts given. Keys are ECDSA P-256: small, fast to make, and
accepted by every TLS stack herder talks to.

Nothing is overwritten unless ``force``: every file is checked before any is
written (and each is linked into place only if its name is still free). Each
file is written whole to a temporary file first, then put in place in one
step, so no reader sees half a key; keys are never readable by others, not
even for an instant (created 0600).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
SERVER_CERT = "server.crt"
SERVER_KEY = "server.key"
FILES = (CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY)
DEFAULT_DAYS = 365
MAX_DAYS = 100 * 366
DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")
# Certificates are valid from a little before now: a machine whose clock runs
# behind must not see a brand-new certificate as "not yet valid".
BACKDATE = dt.timedelta(minutes=5)

_LABEL = r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)"
_DNS_RE = re.compile(rf"(?:\*\.)?{_LABEL}(?:\.{_LABEL})*\.?", re.ASCII)

__all__ = ["FILES", "CertError", "IssuedCerts", "init_certs", "parse_hosts"]


class CertError(ValueError):
    """Bad input or a file in the way; ``str()`` is one line."""


@dataclass(frozen=True)
class IssuedCerts:
    directory: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    dns_names: tuple[str, ...]
    ip_addresses: tuple[str, ...]
    not_after: dt.datetime


def parse_hosts(
    hosts: Iterable[str],
) -> tuple[list[str], list[ipaddress.IPv4Address | ipaddress.IPv6Address]]:
    """The default names plus ``hosts`` → (DNS names, addresses), deduplicated, in order."""
    names: list[str] = []
    ips: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    for raw in (*DEFAULT_HOSTS, *hosts):
        host = raw.strip()
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if not host:
            raise CertError("--host: an empty name")
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            pass
        else:
            if ip not in ips:
                ips.append(ip)
            continue
        if not host.isascii():
            try:
                host = host.encode("idna").decode("ascii")
            except UnicodeError:
                raise CertError(f"--host {raw!r}: not a valid host name") from None
        if len(host) > 253 or not _DNS_RE.fullmatch(host):
            raise CertError(
                f"--host {raw!r}: not a host name or address "
                "(letters, digits, '-' and '.'; '*.' may start a wildcard)"
            )
        host = host.rstrip(".").lower()
        if host not in names:
            names.append(host)
    return names, ips


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _ca(
    key: ec.EllipticCurvePrivateKey, name: str, now: dt.datetime, days: int
) -> x509.Certificate:
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "herder"),
            x509.NameAttribute(NameOID.COMMON_NAME, name),
        ]
    )
    public = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + dt.timedelta(days=days))
        # path_length 0: this CA signs server certificates only, never another CA.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )


def _server(
    key: ec.EllipticCurvePrivateKey,
    ca_key: ec.EllipticCurvePrivateKey,
    ca: x509.Certificate,
    names: Sequence[str],
    ips: Sequence[ipaddress.IPv4Address | ipaddress.IPv6Address],
    now: dt.datetime,
    days: int,
) -> x509.Certificate:
    public = key.public_key()
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
    sans += [x509.IPAddress(ip) for ip in ips]
    common = names[0] if names else str(ips[0])
    return (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "herder"),
                    x509.NameAttribute(NameOID.COMMON_NAME, common),
                ]
            )
        )
        .issuer_name(ca.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )


def _write(path: Path, data: bytes, mode: int, force: bool) -> None:
    """Write ``data`` to a temporary file of ``mode`` beside ``path``, then put it in place.

    Without ``force`` the file is hard-linked to its name, which fails if the
    name was taken meanwhile (``FileExistsError``): never a silent overwrite.
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)  # mkstemp makes it 0600; certificates are public
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if force:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
    finally:
        try:
            os.unlink(tmp)
        except OSError:
            pass


def init_certs(
    directory: str | Path,
    hosts: Iterable[str] = (),
    *,
    days: int = DEFAULT_DAYS,
    force: bool = False,
    ca_name: str = "herder farm CA",
    now: dt.datetime | None = None,
) -> IssuedCerts:
    """Make a CA and a server certificate signed by it in ``directory`` (module docstring).

    ``days``: how long both stay valid. Raises :class:`CertError` (one line)
    for a bad host or ``days``, a directory that cannot be made or written,
    or (without ``force``) a file that exists already; then nothing is written.
    """
    if isinstance(days, bool) or not isinstance(days, int) or not 1 <= days <= MAX_DAYS:
        raise CertError(f"--days {days!r}: expected a whole number of days, 1 to {MAX_DAYS}")
    names, ips = parse_hosts(hosts)
    root = Path(directory).expanduser()
    if root.exists() and not root.is_dir():
        raise CertError(f"{root}: exists and is not a directory")
    paths = {name: root / name for name in FILES}
    if not force:
        taken = [str(p) for p in paths.values() if p.exists() or p.is_symlink()]
        if taken:
            raise CertError(f"{taken[0]} exists: nothing written (--force replaces the files)")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CertError(f"{root}: cannot make the directory: {exc.strerror or exc}") from None
    now = (now or dt.datetime.now(dt.UTC)).replace(microsecond=0)
    ca_key, server_key = _key(), _key()
    ca = _ca(ca_key, ca_name, now, days)
    server = _server(server_key, ca_key, ca, names, ips, now, days)
    files = (
        (CA_KEY, _pem_key(ca_key), 0o600),
        (SERVER_KEY, _pem_key(server_key), 0o600),
        (CA_CERT, _pem_cert(ca), 0o644),
        # The chain a server sends: its certificate, then the CA's.
        (SERVER_CERT, _pem_cert(server) + _pem_cert(ca), 0o644),
    )
    try:
        for name, data, mode in files:
            _write(paths[name], data, mode, force)
    except FileExistsError as exc:
        raise CertError(
            f"{exc.filename2 or exc.filename} appeared meanwhile: not replaced"
        ) from None
    except OSError as exc:
        raise CertError(f"{root}: cannot write: {exc.strerror or exc}") from None
    return IssuedCerts(
        directory=root,
        ca_cert=paths[CA_CERT],
        ca_key=paths[CA_KEY],
        server_cert=paths[SERVER_CERT],
        server_key=paths[SERVER_KEY],
        dns_names=tuple(names),
        ip_addresses=tuple(str(ip) for ip in ips),
        not_after=server.not_valid_after_utc,
    )
