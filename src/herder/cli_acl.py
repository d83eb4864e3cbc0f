"""``herder pool``: pools and their ACLs (who may submit where; issue 11, seeds/002).

- ``herder pool list``: every pool with jobs or an ACL, and who may submit.
- ``herder pool acl show POOL``: the pool's ACL.
- ``herder pool acl set POOL --allow alice,bob``: only these owners may submit
  (``*``: everyone; ``--allow ''``: nobody). Unfinished jobs of other owners in
  the pool are rejected at the next claim, with the reason in their events.
- ``herder pool acl clear POOL``: everyone may submit again.

Exit status: 0 done, 1 the farm refused (422: a bad name), 2 a bad --allow,
75 no master answered.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import click

from herder.cli_common import _fail
from herder.cli_farm import master_timeout_opt

if TYPE_CHECKING:
    from herder.api_acl import PoolAclView
    from herder.api_models import AgentView

_master_opt = click.option(
    "--master",
    "-m",
    envvar="HERDER_MASTER",
    default="http://127.0.0.1:6240",
    help="Master URL(s), comma-separated.",
)
_json_opt = click.option("--json", "as_json", is_flag=True, help="Print JSON.")


def accepts_text(agent: AgentView) -> str:
    """What ``herder agents`` shows of an agent's accept lists."""
    parts = []
    if agent.accept_owners:
        parts.append("owners " + ",".join(agent.accept_owners))
    if agent.accept_pools:
        parts.append("pools " + ",".join(agent.accept_pools))
    return "; ".join(parts) or "everyone"


def _acl_path(pool: str) -> str:
    return f"/pools/{quote(pool, safe='')}/acl"


def _request(
    master: str, master_timeout: str | None, model: Any, method: str, path: str, **kw: Any
) -> Any:
    # herder.cli imports this module: its helpers are looked up at call time.
    from herder.cli import _call, _client

    with _client(master, master_timeout) as client:
        return _call(client._call, model, method, path, **kw)


def _print_acl(view: PoolAclView, as_json: bool) -> None:
    from herder.cli import console
    from herder.display import printable

    if as_json:
        print(view.model_dump_json(indent=2))
        return
    if view.everyone:
        who = "everyone" + ("" if view.restricted else " (no ACL)")
    elif not view.allow:
        who = "nobody (closed)"
    else:
        who = ", ".join(view.allow)
    console().print(printable(f"pool {view.pool}: {who}"), highlight=False, markup=False)


@click.group(name="pool")
def pool() -> None:
    """Pools and who may submit to them (ACLs)."""


@pool.command(name="list")
@_master_opt
@_json_opt
@master_timeout_opt
def list_pools(master: str, as_json: bool, master_timeout: str | None) -> None:
    """Every pool with jobs or an ACL, and who may submit to it."""
    from herder.api_acl import PoolList
    from herder.cli import _table, console
    from herder.display import markup_safe

    got: PoolList = _request(master, master_timeout, PoolList, "GET", "/pools", idempotent=True)
    if as_json:
        print(json.dumps(got.model_dump(mode="json")["pools"], indent=2))
        return
    table = _table("pool", "may submit", "live jobs", "jobs")
    for p in got.pools:
        who = "everyone" if p.everyone else (", ".join(p.allow) or "nobody")
        table.add_row(markup_safe(p.name), markup_safe(who), str(p.live_jobs), str(p.jobs))
    console().print(table)


@pool.group(name="acl")
def acl() -> None:
    """Show, set or clear a pool's ACL."""


@acl.command()
@click.argument("pool_name", metavar="POOL")
@_master_opt
@_json_opt
@master_timeout_opt
def show(pool_name: str, master: str, as_json: bool, master_timeout: str | None) -> None:
    """Who may submit to POOL."""
    from herder.api_acl import PoolAclView

    view = _request(
        master, master_timeout, PoolAclView, "GET", _acl_path(pool_name), idempotent=True
    )
    _print_acl(view, as_json)


@acl.command(name="set")
@click.argument("pool_name", metavar="POOL")
@click.option(
    "--allow",
    required=True,
    help="Owners allowed to submit, comma-separated ('*': everyone, '': nobody).",
)
@_master_opt
@_json_opt
@master_timeout_opt
def set_acl(
    pool_name: str, allow: str, master: str, as_json: bool, master_timeout: str | None
) -> None:
    """Let only the --allow owners submit to POOL; other owners' unfinished jobs in it
    are rejected at the next claim."""
    from herder.api_acl import PoolAclView
    from herder.core.acl import parse_names

    try:
        names = parse_names(allow)
    except ValueError as exc:
        _fail(f"--allow: {exc}", 2)
    view = _request(
        master,
        master_timeout,
        PoolAclView,
        "PUT",
        _acl_path(pool_name),
        json={"allow": names},
        idempotent=True,
    )
    _print_acl(view, as_json)


@acl.command()
@click.argument("pool_name", metavar="POOL")
@_master_opt
@_json_opt
@master_timeout_opt
def clear(pool_name: str, master: str, as_json: bool, master_timeout: str | None) -> None:
    """Remove POOL's ACL: everyone may submit again."""
    from herder.api_acl import PoolAclView

    view = _request(
        master, master_timeout, PoolAclView, "DELETE", _acl_path(pool_name), idempotent=True
    )
    _print_acl(view, as_json)


__all__ = ["accepts_text", "pool"]
