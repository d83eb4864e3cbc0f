"""``herder user …`` and ``herder token …``: users, roles and API tokens (issue 11).

Each command talks to a master as an admin (``--master``, the token from
``herder --token``/``HERDER_TOKEN``/the token file, see ``herder.client.auth``),
or, with ``--db URL``, works on the database directly: that is how the
first admin is made before any master has a user (``herder user add admin
--role admin --db …`` then ``herder token create --user admin --db …``), as
an alternative to the bootstrap token ``herder master`` prints when it starts
on a database without users.

``herder token create`` prints the token alone on stdout (``TOKEN=$(herder
token create --user bob)``): it is shown this once and stored only hashed.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
from collections.abc import Iterator
from typing import Any

import click

from herder.cli_common import _fail, _masters

DEFAULT_MASTER = "http://127.0.0.1:6240"
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> float:
    """``90s``, ``30m``, ``12h``, ``30d``, ``2w`` (or plain seconds) → seconds."""
    m = _DURATION.match(text)
    if m is None or float(m.group(1)) <= 0:
        raise click.BadParameter(f"{text!r}: expected a duration such as 90s, 12h, 30d, 2w")
    return float(m.group(1)) * _UNITS[m.group(2)]


def _set_token(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    # Every client of this command reads HERDER_TOKEN (herder.client.auth).
    if value:
        os.environ["HERDER_TOKEN"] = value


#: ``herder --token …``: the token every command of this run sends.
token_opt = click.option(
    "--token",
    default=None,
    expose_value=False,
    is_eager=True,
    callback=_set_token,
    help="API token to send (else HERDER_TOKEN, HERDER_TOKEN_FILE, ~/.config/herder/token).",
)

_master_opt = click.option(
    "--master",
    "-m",
    envvar="HERDER_MASTER",
    default=None,
    help=f"Master URL(s), comma-separated (default {DEFAULT_MASTER}).",
)
_db_opt = click.option(
    "--db",
    default=None,
    help="Work on this database directly instead of through a master (bootstrapping).",
)
_json_opt = click.option("--json", "as_json", is_flag=True, help="Print JSON.")


class _Api:
    """The user and token calls, through a master (as its admin) or on a database."""

    def __init__(self, master: str | None, db: str | None) -> None:
        self.client: Any = None
        self.auth: Any = None
        if db is not None:
            from herder.store import Store
            from herder.store.auth import AuthStore

            self.store = Store.open(db, migrate=True)
            self.auth = AuthStore(self.store)
        else:
            from herder.cli_farm import farm_client

            self.client = farm_client(_masters(master or DEFAULT_MASTER), None)

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
        else:
            self.store.close()

    def call(self, model: Any, method: str, path: str, body: Any = None) -> Any:
        return self.client._call(model, method, path, json=body, idempotent=method != "POST")


@contextlib.contextmanager
def _api(master: str | None, db: str | None) -> Iterator[_Api]:
    from herder.client import ApiError, NoMasterAvailable
    from herder.errors import HerderError

    api: _Api | None = None
    try:
        api = _Api(master, db)
        yield api
    except ApiError as exc:
        _fail(f"{exc.code}: {exc.message}")
    except NoMasterAvailable as exc:
        from herder.cli_farm import no_master

        no_master(exc)
    except HerderError as exc:
        _fail(f"{exc.code}: {exc.message}")
    finally:
        if api is not None:
            api.close()


def _print_json(items: list[Any]) -> None:
    print(json.dumps([i.model_dump(mode="json") for i in items], indent=2))


# ------------------------------------------------------------------- users


@click.group(name="user")
def user() -> None:
    """Users and their roles: admin (everything), submitter (submits, controls its own
    jobs), viewer (reads)."""


@user.command(name="add")
@click.argument("name")
@click.option(
    "--role",
    type=click.Choice(["admin", "submitter", "viewer"]),
    default="submitter",
    help="What the user may do.",
)
@_master_opt
@_db_opt
def user_add(name: str, role: str, master: str | None, db: str | None) -> None:
    """Add a user."""
    from herder.api_auth import UserCreate, UserView

    with _api(master, db) as api:
        if api.auth is not None:
            view = api.auth.add_user(name, role)
        else:
            view = api.call(UserView, "POST", "/users", UserCreate(name=name, role=role))  # type: ignore[arg-type]
    print(f"user {view.name} ({view.role}) added")


@user.command(name="list")
@_master_opt
@_db_opt
@_json_opt
def user_list(master: str | None, db: str | None, as_json: bool) -> None:
    """List the users."""
    from herder.api_auth import UserList

    with _api(master, db) as api:
        users = (
            api.auth.list_users()
            if api.auth is not None
            else api.call(UserList, "GET", "/users").users
        )
    if as_json:
        _print_json(users)
        return
    for u in users:
        state = " disabled" if u.disabled else ""
        print(f"{u.name}\t{u.role}\t{u.created_at.isoformat()}{state}")


@user.command(name="remove")
@click.argument("name")
@_master_opt
@_db_opt
def user_remove(name: str, master: str | None, db: str | None) -> None:
    """Remove a user and revoke every token of theirs (their jobs stay)."""
    with _api(master, db) as api:
        if api.auth is not None:
            api.auth.remove_user(name)
        else:
            api.client._request("DELETE", f"/users/{name}", idempotent=True).close()
    print(f"user {name} removed")


# ------------------------------------------------------------------ tokens


@click.group(name="token")
def token() -> None:
    """API tokens: hdr_<id>_<secret>, stored hashed, shown once."""


@token.command(name="create")
@click.option("--user", "user_name", default=None, help="The user the token acts as.")
@click.option("--join", is_flag=True, help="A join token: it only registers new agents.")
@click.option("--expires", default=None, help="Lifetime: 90s, 12h, 30d, 2w (default: none).")
@click.option("--description", default=None, help="What the token is for.")
@_master_opt
@_db_opt
def token_create(
    user_name: str | None,
    join: bool,
    expires: str | None,
    description: str | None,
    master: str | None,
    db: str | None,
) -> None:
    """Make a token (printed once, on stdout)."""
    from herder.api_auth import TokenCreate, TokenCreated

    if join == (user_name is not None):
        _fail("give --user NAME or --join", 2)
    expires_s = parse_duration(expires) if expires is not None else None
    with _api(master, db) as api:
        if api.auth is not None:
            view, secret = api.auth.create_token(
                "join" if join else "user",
                user=user_name,
                expires_s=expires_s,
                description=description,
                created_by="cli",
            )
        else:
            body = TokenCreate(
                user=user_name, join=join, expires_s=expires_s, description=description
            )
            made = api.call(TokenCreated, "POST", "/tokens", body)
            view, secret = made, made.token
    what = "join token" if join else f"token of {user_name}"
    until = f", expires {view.expires_at.isoformat()}" if view.expires_at else ""
    print(f"{what} {view.id}{until}: shown this once", file=sys.stderr)
    print(secret)


@token.command(name="list")
@_master_opt
@_db_opt
@_json_opt
def token_list(master: str | None, db: str | None, as_json: bool) -> None:
    """List tokens (never their secrets)."""
    from herder.api_auth import TokenList

    with _api(master, db) as api:
        tokens = (
            api.auth.list_tokens()
            if api.auth is not None
            else api.call(TokenList, "GET", "/tokens").tokens
        )
    if as_json:
        _print_json(tokens)
        return
    for t in tokens:
        who = t.user or t.agent_id or "-"
        state = "revoked" if t.revoked_at else "active"
        expires = t.expires_at.isoformat() if t.expires_at else "never"
        print(f"{t.id}\t{t.kind}\t{who}\t{state}\texpires {expires}\t{t.description or ''}")


@token.command(name="revoke")
@click.argument("token_id")
@_master_opt
@_db_opt
def token_revoke(token_id: str, master: str | None, db: str | None) -> None:
    """Revoke a token now (by its id, the <id> of hdr_<id>_…)."""
    from herder.api_auth import TokenView

    with _api(master, db) as api:
        if api.auth is not None:
            api.auth.revoke_token(token_id)
        else:
            api.call(TokenView, "POST", f"/tokens/{token_id}/revoke")
    print(f"token {token_id} revoked")


# ------------------------------------------------------------ herder master


def _set_insecure(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    # MasterConfig reads it (herder.master.context.insecure_from_env).
    if value:
        os.environ["HERDER_INSECURE_NO_AUTH"] = "1"


#: ``herder master --insecure-no-auth``.
insecure_opt = click.option(
    "--insecure-no-auth",
    is_flag=True,
    envvar="HERDER_INSECURE_NO_AUTH",
    expose_value=False,
    callback=_set_insecure,
    help="Check no token at all: anyone who reaches the master may submit, cancel and "
    "run commands on its agents (logged as a warning). Default: every request but "
    "/healthz, /metrics and the API docs needs a token.",
)


def bootstrap_admin(db: str, read_only: bool = False) -> None:
    """On a database without users, make user ``admin`` and print its token once (stderr).

    ``herder master`` calls this before serving; a database that cannot be
    opened is left to the master's own start-up to report.
    """
    from herder.errors import DatabaseError
    from herder.master.context import MasterConfig
    from herder.store import Store
    from herder.store.auth import AuthStore

    if read_only or not MasterConfig().auth:
        return
    try:
        store = Store.open(db, migrate=True)
    except DatabaseError:
        return
    try:
        secret = AuthStore(store).bootstrap_admin()
    except DatabaseError:
        return
    finally:
        store.close()
    if secret is not None:
        print(
            "herder master: no users yet: made user 'admin' (role admin) with this token, "
            "shown once:\n"
            f"  {secret}\n"
            "  export HERDER_TOKEN=… to use it; make more with 'herder user add' and "
            "'herder token create'",
            file=sys.stderr,
            flush=True,
        )


def _set_join_token(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    # AgentConfig reads it (join_token).
    if value:
        os.environ["HERDER_JOIN_TOKEN"] = value


#: ``herder agent --join-token …``.
join_token_opt = click.option(
    "--join-token",
    default=None,
    expose_value=False,
    callback=_set_join_token,
    help="A join token (herder token create --join; else $HERDER_JOIN_TOKEN): registers "
    "this agent once; the agent then keeps its own token in its state dir (0600).",
)
