"""Small helpers every ``herder`` command shares: exit statuses, errors, URLs, listen addresses."""

from __future__ import annotations

import sys

import click


class Exit(click.exceptions.Exit):
    """Leave the command with an exit status (click's, so a test runner sees it too)."""


def _masters(value: str) -> list[str]:
    urls = [u.strip().rstrip("/") for u in value.split(",") if u.strip()]
    if not urls:
        raise click.BadParameter("no master URL given")
    return urls


def _fail(message: str, code: int = 1) -> None:
    # Plain write: an error is one line, never wrapped to the terminal width;
    # printable, since it may quote what a farm or a file said (issue 11).
    from herder.display import printable

    print(f"error: {printable(message)}", file=sys.stderr, flush=True)
    raise Exit(code)


def _parse_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise click.BadParameter(f"expected HOST:PORT, got {listen!r}")
    return host.strip("[]") or "127.0.0.1", int(port)
