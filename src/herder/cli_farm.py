"""The farm client of the CLI's commands: ``--master-timeout``, outage riding, giving up.

Every command that talks to a farm over HTTP builds its client here: it waits
out master outages (``herder.client.outage``) across the masters given and
those their directory lists, announces them on stderr, and when no master
answered for the master timeout prints one line and exits
:data:`~herder.client.outage.EXIT_NO_MASTER` (75) without cancelling anything.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, NoReturn

import click

if TYPE_CHECKING:
    from herder.client import HerderClient
    from herder.client.outage import OutagePolicy

master_timeout_opt = click.option(
    "--master-timeout",
    metavar="DURATION",
    default=None,
    help="How long to wait for a master when none answers, per outage: seconds, or "
    "90s, 5m, 1h (default: $HERDER_MASTER_TIMEOUT, else 5m; 0: fail at once). "
    "Giving up exits 75; a job goes on in the farm.",
)

_master_hint: str | None = None  # the --master of this command, for the give-up message


def outage_policy(master_timeout: str | None) -> OutagePolicy:
    """From --master-timeout, else $HERDER_MASTER_TIMEOUT; a bad value exits 2 naming it."""
    from herder.client.outage import OutagePolicy, resolve_master_timeout

    try:
        seconds = resolve_master_timeout(master_timeout, os.environ)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        raise click.exceptions.Exit(2) from None

    def announce(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    return OutagePolicy(timeout_s=seconds, announce=announce)


def farm_client(urls: list[str], master_timeout: str | None) -> HerderClient:
    """A client of the farm at ``urls`` that waits out outages."""
    global _master_hint
    from herder.client import HerderClient
    from herder.client.discovery import MasterDiscovery

    class FarmClient(HerderClient):
        def close(self) -> None:
            super().close()
            discovery.close()

    policy = outage_policy(master_timeout)
    _master_hint = ",".join(urls)
    discovery = MasterDiscovery(urls)
    return FarmClient(urls, discovery=discovery, outage=policy)


def no_master(exc: Exception, job_id: int | None = None) -> NoReturn:
    """Print why the command stops waiting for a master and exit 75."""
    from herder.client.errors import NoMasterAvailable
    from herder.client.outage import EXIT_NO_MASTER, gave_up_message

    assert isinstance(exc, NoMasterAvailable)
    print(gave_up_message(exc, job_id=job_id, master=_master_hint), file=sys.stderr, flush=True)
    raise click.exceptions.Exit(EXIT_NO_MASTER)
