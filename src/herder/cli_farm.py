"""The farm client of the CLI's commands: ``--master-timeout``, outage riding, giving up.

Every command that talks to a farm over HTTP builds its client here: it waits
out master outages (``herder.client.outage``) across the masters given and
those their directory lists, announces them on stderr, and when no master
answered for the master timeout prints one line and exits
:data:`~herder.client.outage.EXIT_NO_MASTER` (75) without cancelling anything.
When every master is busy it says so and waits in line with priority
(seeds/004), or with ``herder --no-wait`` gives up the same way.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click

if TYPE_CHECKING:
    from herder.client import HerderClient
    from herder.client.deferral import BusyRound
    from herder.client.outage import OutagePolicy

_F = TypeVar("_F", bound=Callable[..., Any])
_master_timeout_opt = click.option(
    "--master-timeout",
    metavar="DURATION",
    default=None,
    help="How long to wait for a master when none answers, per outage: seconds, or "
    "90s, 5m, 1h (default: $HERDER_MASTER_TIMEOUT, else 5m; 0: fail at once). "
    "Giving up exits 75; a job goes on in the farm.",
)


def master_timeout_opt(f: _F) -> _F:
    """``--master-timeout`` and ``--ca``: options of every command that talks to a farm."""
    from herder.cli_certs import ca_opt

    return ca_opt(_master_timeout_opt(f))


_no_wait = False  # --no-wait of this command


def _set_no_wait(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    global _no_wait
    _no_wait = bool(value)


#: A global option of ``herder`` (``herder --no-wait status 7``): ``herder submit`` has a
#: ``--wait/--no-wait`` of its own (wait for the job to finish).
no_wait_opt = click.option(
    "--no-wait",
    is_flag=True,
    default=False,
    envvar="HERDER_NO_WAIT",
    expose_value=False,
    callback=_set_no_wait,
    help="When every master is busy, give up (exit 75) instead of waiting in line "
    "with priority (default: $HERDER_NO_WAIT, else wait).",
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
    return FarmClient(urls, discovery=discovery, outage=policy, on_all_busy=_all_busy)


def _all_busy(busy: BusyRound) -> bool:
    """Every master is busy: say so and wait in line with priority, or (--no-wait) give up."""
    if _no_wait:
        return False  # no_master prints the one line
    if busy.during_outage:
        return True  # said once already, when the outage began
    from herder.display import printable

    line = f"herder: every master is busy ({busy.summary}); waiting with priority"
    print(printable(line), file=sys.stderr, flush=True)
    return True


def no_master(exc: Exception, job_id: int | None = None) -> NoReturn:
    """Print why the command stops waiting for a master and exit 75."""
    from herder.client.errors import (
        DEAD_OUTCOMES,
        MasterOutageTimeout,
        NoMasterAvailable,
        WaitDeclined,
        describe_attempts,
    )
    from herder.client.outage import EXIT_NO_MASTER, format_duration, gave_up_message
    from herder.display import printable
    from herder.tlsconf import TlsVerifyError

    assert isinstance(exc, NoMasterAvailable)
    if isinstance(exc, TlsVerifyError):
        # Not an outage (75): the CA or a certificate is wrong, and waiting will not fix it.
        print(printable(f"error: {exc.line}"), file=sys.stderr, flush=True)
        raise click.exceptions.Exit(1)
    if isinstance(exc, WaitDeclined):
        text = f"herder: every master is busy ({describe_attempts(exc.attempts)}); not waiting"
        text += " (--no-wait)" + _job_goes_on(job_id)
    elif isinstance(exc, MasterOutageTimeout) and all(
        a.outcome in DEAD_OUTCOMES for a in exc.attempts
    ):
        text = gave_up_message(exc, job_id=job_id, master=_master_hint)
    else:
        # Masters answered, but none could handle it: say what each said.
        waited = getattr(exc, "waited", 0.0)
        text = f"herder: {exc}" + (f" (waited {format_duration(waited)})" if waited else "")
        text += _job_goes_on(job_id)
    print(printable(text), file=sys.stderr, flush=True)
    raise click.exceptions.Exit(EXIT_NO_MASTER)


def _job_goes_on(job_id: int | None) -> str:
    if job_id is None:
        return ""
    where = f" --master {_master_hint}" if _master_hint else ""
    return f"; job {job_id} goes on in the farm — follow it with 'herder status {job_id}{where}'"
