"""``herder certs``: a farm's CA and server certificate (``herder.certs``; DESIGN §11).

Also the ``--ca`` option of the client commands (:data:`ca_opt`): it sets the
CA bundle of every client this process builds (``herder.tlsconf``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from herder.cli_common import _fail

_F = TypeVar("_F", bound=Callable[..., Any])


def _set_ca(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    if not value:
        return
    from herder.tlsconf import TlsConfigError, client_context, set_default_ca

    try:
        client_context(value)  # a bad bundle is one line now, not at the first request
    except TlsConfigError as exc:
        _fail(str(exc), 2)
    set_default_ca(value)


ca_opt = click.option(
    "--ca",
    metavar="PATH",
    envvar="HERDER_CA",
    default=None,
    expose_value=False,
    callback=_set_ca,
    help="CA bundle (PEM) to verify https:// masters and agents with "
    "(default: $HERDER_CA, else the system trust store).",
)


@click.group()
def certs() -> None:
    """TLS certificates of a farm."""


@certs.command("init")
@click.argument("directory", type=click.Path(path_type=Path))
@click.option(
    "--host",
    "hosts",
    multiple=True,
    metavar="NAME",
    help="Another name or address of the server certificate (repeatable); "
    "localhost, 127.0.0.1 and ::1 are always in it.",
)
@click.option(
    "--days", type=int, default=365, help="How long the CA and the certificate stay valid."
)
@click.option("--force", is_flag=True, help="Replace files that exist already.")
def init(directory: Path, hosts: tuple[str, ...], days: int, force: bool) -> None:
    """Make a farm CA and a server certificate signed by it in DIRECTORY.

    Writes ca.crt, ca.key, server.crt and server.key (keys 0600). Give ca.crt
    to clients and agents (--ca or HERDER_CA); server.crt and server.key to
    masters and agents (--tls-cert, --tls-key). Keep ca.key safe.
    """
    from herder.certs import CertError, init_certs

    try:
        issued = init_certs(directory, hosts, days=days, force=force)
    except CertError as exc:
        _fail(str(exc))
        return
    names = ", ".join((*issued.dns_names, *issued.ip_addresses))
    click.echo(f"CA:          {issued.ca_cert} (key {issued.ca_key})")
    click.echo(f"certificate: {issued.server_cert} (key {issued.server_key})")
    click.echo(f"names:       {names}")
    click.echo(f"valid until: {issued.not_after.isoformat().replace('+00:00', 'Z')}")


def tls_server_opts(f: _F) -> _F:
    """``--tls-cert``, ``--tls-key`` (HTTPS on this daemon's listeners) and ``--ca``."""
    f = click.option(
        "--tls-key",
        metavar="PATH",
        envvar="HERDER_TLS_KEY",
        default=None,
        help="Private key (PEM) of --tls-cert.",
    )(f)
    f = click.option(
        "--tls-cert",
        metavar="PATH",
        envvar="HERDER_TLS_CERT",
        default=None,
        help="Certificate chain (PEM): serve HTTPS instead of HTTP (`herder certs init`).",
    )(f)
    return ca_opt(f)


def check_server_tls(cert: str | None, key: str | None) -> None:
    """Both or neither, and loadable: else one ``error:`` line and exit 2."""
    from herder.tlsconf import TlsConfigError, check_pair, server_context

    try:
        if check_pair(cert, key):
            assert cert is not None and key is not None
            server_context(cert, key)
    except TlsConfigError as exc:
        _fail(str(exc), 2)
