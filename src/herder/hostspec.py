"""``host``, ``host:port``, ``[v6]`` and ``[v6]:port`` words of a Rakefile's ``HOSTS`` line."""

from __future__ import annotations

import re

__all__ = ["parse_host"]

_PORT_RE = re.compile(r"[0-9]+", re.ASCII)
_HOSTNAME_RE = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?", re.ASCII)
_IPV6_RE = re.compile(r"[0-9A-Fa-f:.]+(?:%[A-Za-z0-9_.-]+)?", re.ASCII)


def parse_host(token: str, default_port: int | None) -> tuple[str, int | None]:
    """Parse ``host``, ``host:port``, ``[v6]`` or ``[v6]:port``.

    Returns ``(name, port)``; port is ``default_port`` when the token has none.
    Raises ``ValueError`` with a message and, as ``args[1]``, the 0-based
    offset of the offending character within ``token``.
    """
    if token.startswith("["):
        end = token.find("]")
        if end < 0:
            raise ValueError(
                "unclosed '[' in IPv6 host; expected '[address]' or '[address]:port'", 0
            )
        name = token[1:end]
        if not name or not _IPV6_RE.fullmatch(name) or ":" not in name:
            raise ValueError(f"{name!r} is not an IPv6 address", 1)
        rest = token[end + 1 :]
        if not rest:
            return name, default_port
        if not rest.startswith(":"):
            raise ValueError("expected ':port' after ']'", end + 1)
        port_off = end + 2
        port_s = rest[1:]
    else:
        colon = token.find(":")
        name = token if colon < 0 else token[:colon]
        if not name:
            raise ValueError("host name is empty; expected 'host' or 'host:port'", 0)
        if not _HOSTNAME_RE.fullmatch(name):
            bad = next(
                (
                    i
                    for i, c in enumerate(name)
                    if not (c.isascii() and (c.isalnum() or c in "_.-"))
                ),
                0,
            )
            raise ValueError(
                f"{name!r} is not a valid host name (letters, digits, '.', '-', '_'; "
                "IPv6 addresses go in brackets)",
                bad,
            )
        if colon < 0:
            return name, default_port
        port_off = colon + 1
        port_s = token[port_off:]
    if not port_s:
        raise ValueError("port is missing after ':'; expected 'host:port'", port_off)
    if not _PORT_RE.fullmatch(port_s):
        bad = next((i for i, c in enumerate(port_s) if not ("0" <= c <= "9")), 0)
        raise ValueError(f"port {port_s!r} is not an integer", port_off + bad)
    port = int(port_s)
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} is out of range 1..65535", port_off)
    return name, port
