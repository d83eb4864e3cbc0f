"""``herder share`` and ``herder limit``: the scheduler's knobs (DESIGN §8, seeds/001).

- ``herder share``: owners, their weights and the slot-seconds they used over
  the share window; ``herder share OWNER WEIGHT`` sets a weight (default 1).
- ``herder limit AGENT [--max-ram-mb N] [--max-load L]``: change an agent's
  own limits at run time (``none`` lifts one); without options, show them.

Exit status: 0 done, 1 the farm refused (404 unknown agent, 422 a bad
value), 2 a bad option, 75 no master answered.
"""

from __future__ import annotations

import json
import math
from typing import Any
from urllib.parse import quote

import click

from herder.cli_acl import _json_opt, _master_opt, _request
from herder.cli_common import _fail
from herder.cli_farm import master_timeout_opt


def _limit_value(opt: str, text: str | None, kind: type[Any]) -> Any:
    if text is None or text.strip().lower() == "none":
        return None
    try:
        value = kind(text)
    except ValueError:
        _fail(f"--{opt}: {text!r} is not a number (or 'none')", 2)
    if not math.isfinite(value) or value <= 0:
        _fail(f"--{opt}: must be above 0 (or 'none')", 2)
    return value


@click.command(name="share")
@click.argument("owner", required=False)
@click.argument("weight", required=False, type=float)
@_master_opt
@_json_opt
@master_timeout_opt
def share(
    owner: str | None, weight: float | None, master: str, as_json: bool, master_timeout: str | None
) -> None:
    """Owners' fair-share weights and use; OWNER WEIGHT sets one (2 gets twice the slots of 1)."""
    from herder.api_models import OwnerShareList, OwnerShareView
    from herder.cli import _table, console
    from herder.display import markup_safe, printable

    if owner is not None and weight is None:
        _fail("give a WEIGHT after the OWNER (or neither, to list)", 2)
    if weight is not None:
        if not math.isfinite(weight) or weight <= 0:
            _fail("WEIGHT must be above 0", 2)
        view = _request(
            master,
            master_timeout,
            OwnerShareView,
            "PUT",
            f"/owners/{quote(owner or '', safe='')}/share",
            json={"weight": weight},
            idempotent=True,
        )
        if as_json:
            print(view.model_dump_json(indent=2))
        else:
            console().print(
                printable(f"owner {view.owner or '(none)'}: weight {view.weight:g}"),
                highlight=False,
                markup=False,
            )
        return
    listing = _request(master, master_timeout, OwnerShareList, "GET", "/owners", idempotent=True)
    if as_json:
        print(json.dumps([s.model_dump(mode="json") for s in listing.owners], indent=2))
        return
    table = _table("owner", "weight", "slot-seconds (window)")
    for s in listing.owners:
        table.add_row(markup_safe(s.owner or "(none)"), f"{s.weight:g}", f"{s.used_slot_s:.0f}")
    console().print(table)


@click.command(name="limit")
@click.argument("agent_id", metavar="AGENT")
@click.option(
    "--max-ram-mb", default=None, help="The most RAM its tasks may reserve; 'none' lifts it."
)
@click.option(
    "--max-load", default=None, help="No new task at this 1-minute load; 'none' lifts it."
)
@_master_opt
@_json_opt
@master_timeout_opt
def limit(
    agent_id: str,
    max_ram_mb: str | None,
    max_load: str | None,
    master: str,
    as_json: bool,
    master_timeout: str | None,
) -> None:
    """Show or change an agent's own limits at run time (its next claim follows them)."""
    from herder.api_models import AgentView
    from herder.cli import console
    from herder.display import printable

    body: dict[str, Any] = {}
    if max_ram_mb is not None:
        body["max_ram_mb"] = _limit_value("max-ram-mb", max_ram_mb, int)
    if max_load is not None:
        body["max_load"] = _limit_value("max-load", max_load, float)
    path = f"/agents/{quote(agent_id, safe='')}"
    if body:
        view = _request(
            master, master_timeout, AgentView, "PATCH", path, json=body, idempotent=True
        )
    else:
        view = _request(master, master_timeout, AgentView, "GET", path, idempotent=True)
    if as_json:
        print(view.model_dump_json(indent=2))
        return
    ram = "all" if view.max_ram_mb is None else f"{view.max_ram_mb} MB"
    load = "none" if view.max_load is None else f"{view.max_load:g}"
    console().print(
        printable(f"agent {view.id}: max RAM {ram}, max load {load}"), highlight=False, markup=False
    )
