"""The CLI's long-running processes: ``herder master`` and ``herder agent``.

Kept apart from ``herder.cli`` (the client commands) so each module stays
readable; ``herder.cli`` registers both on its group. Helpers shared with the
client commands live in ``herder.cli_common``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import click

from herder.cli_auth import bootstrap_admin, insecure_opt, join_token_opt
from herder.cli_certs import check_server_tls, tls_server_opts
from herder.cli_common import Exit, _fail, _masters, _parse_listen


def _ram_retry_env(param: click.Parameter, value: str | None) -> None:
    """Check a memory-retry option and hand it to the store (herder.store.watch reads it)."""
    if value is None:
        return
    from herder.store.watch import (
        RAM_RETRY_CEILING_ENV,
        RAM_RETRY_FACTOR_ENV,
        ram_retry_policy_from_env,
    )

    name = RAM_RETRY_FACTOR_ENV if param.name == "ram_retry_factor" else RAM_RETRY_CEILING_ENV
    try:
        ram_retry_policy_from_env({name: value})
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    os.environ[name] = value


@click.command()
@click.option(
    "--db",
    envvar="HERDER_DB",
    default="sqlite:///herder.db",
    help="Database URL: sqlite:///path.db or postgresql+psycopg://user@host/db",
)
@click.option("--listen", default="127.0.0.1:6240", help="HOST:PORT to listen on.")
@click.option("--lease", type=float, default=30.0, help="Lease length in seconds.")
@click.option("--ack-timeout", type=float, default=30.0, help="Seconds an offer waits for its ack.")
@click.option("--log-level", default="info", help="debug, info, warning, error")
@click.option(
    "--advertise-url",
    envvar="HERDER_ADVERTISE_URL",
    default=None,
    help="The URL agents use to reach this master, listed in the master directory "
    "(default: http://<listen host>:<port>).",
)
@click.option(
    "--retention",
    envvar="HERDER_RETENTION",
    default="14d",
    help="Prune finished jobs (and blobs nothing references) this long after they finish: "
    "90s, 30m, 12h, 14d, 2w; 0 or off keeps everything.",
)
@click.option(
    "--ram-retry-factor",
    envvar="HERDER_RAM_RETRY_FACTOR",
    default=None,
    expose_value=False,
    callback=lambda ctx, param, value: _ram_retry_env(param, value),
    help="A task killed for exceeding its RAM is retried with its ram_mb times this "
    "(1.1-10; default 1.5).",
)
@click.option(
    "--ram-retry-ceiling-mb",
    envvar="HERDER_RAM_RETRY_CEILING_MB",
    default=None,
    expose_value=False,
    callback=lambda ctx, param, value: _ram_retry_env(param, value),
    help="The most RAM a memory retry asks for (default 65536, and at most the largest "
    "agent's RAM).",
)
@click.option(
    "--read-only",
    is_flag=True,
    envvar="HERDER_READ_ONLY",
    help="Serve reads only, from a PostgreSQL hot standby (--db): writes are answered "
    "no-service (421) naming the read-write masters. Never migrates nor writes the database.",
)
@click.option(
    "--register-via",
    multiple=True,
    envvar="HERDER_REGISTER_VIA",
    help="With --read-only: a read-write master URL to list this master in the directory "
    "through (repeatable; those of the replicated directory are used too).",
)
@click.option(
    "--register-token",
    envvar="HERDER_REGISTER_TOKEN",
    default=None,
    help="With --read-only: the (admin) token it registers with at read-write masters.",
)
@click.option(
    "--admission-workers",
    type=click.IntRange(min=1),
    envvar="HERDER_ADMISSION_WORKERS",
    default=32,
    show_default=True,
    help="Store calls served at once; more wait in the admission queue.",
)
@click.option(
    "--admission-depth",
    type=click.IntRange(min=0),
    envvar="HERDER_ADMISSION_DEPTH",
    default=512,
    show_default=True,
    help="Calls that may wait in the admission queue; past it, requests without "
    "priority are answered busy (503) with alternates.",
)
@click.option(
    "--write-wait-s",
    type=click.FloatRange(min=0),
    envvar="HERDER_WRITE_WAIT_S",
    default=10.0,
    show_default=True,
    help="A write without priority waiting longer than this for the database is answered busy.",
)
@tls_server_opts
@insecure_opt
def master(
    db: str,
    listen: str,
    lease: float,
    ack_timeout: float,
    log_level: str,
    advertise_url: str | None,
    retention: str,
    read_only: bool,
    register_via: tuple[str, ...],
    register_token: str | None,
    admission_workers: int,
    admission_depth: int,
    write_wait_s: float,
    tls_cert: str | None,
    tls_key: str | None,
) -> None:
    """Run a master: the HTTP API over the job queue in the database.

    With --tls-cert/--tls-key it serves HTTPS; --ca verifies agents' https://
    talkback endpoints (default: $HERDER_CA, else the system trust store).
    """
    from herder.logsetup import setup_logging
    from herder.master.server import serve

    check_server_tls(tls_cert, tls_key)

    setup_logging(log_level)
    host, port = _parse_listen(listen)
    from herder.store.retention import RETENTION_ENV, parse_retention

    try:
        parse_retention(retention)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--retention") from None
    os.environ[RETENTION_ENV] = retention  # the store's policy reads it (RetentionPolicy.from_env)
    if advertise_url is not None:
        from herder.master.server import normalize_advertise_url

        try:
            advertise_url = normalize_advertise_url(advertise_url)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--advertise-url") from None
    if register_via:
        from herder.master.server import normalize_advertise_url

        for url in register_via:
            try:
                normalize_advertise_url(url)
            except ValueError as exc:
                raise click.BadParameter(str(exc), param_hint="--register-via") from None
    bootstrap_admin(db, read_only)  # a database without users: the first admin's token
    serve(
        db,
        host,
        port,
        lease_s=lease,
        ack_timeout_s=ack_timeout,
        advertise_url=advertise_url,
        read_only=read_only,
        admission_workers=admission_workers,
        admission_depth=admission_depth,
        write_wait_s=write_wait_s,
        register_via=list(register_via),
        register_token=register_token,
        tls_cert=tls_cert,
        tls_key=tls_key,
    )


@click.command()
@click.option(
    "--master",
    "-m",
    envvar="HERDER_MASTER",
    default=None,
    help="Master URL(s), comma-separated, tried first in this order "
    "(default: http://127.0.0.1:6240 unless --dns-name is given).",
)
@click.option(
    "--slots", type=click.IntRange(min=0), default=0, help="Tasks run at once (0: CPU count)."
)
@click.option("--tags", default="", help="Comma-separated tags this agent offers.")
@click.option("--name", default=None, help="Agent name (default: hostname).")
@click.option(
    "--state-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Where the agent keeps its id, blob cache and sandboxes.",
)
@click.option(
    "--drain-timeout",
    type=float,
    default=30.0,
    help="Seconds to let running tasks finish on SIGTERM.",
)
@click.option("--log-level", default="info", help="debug, info, warning, error")
@click.option(
    "--talkback",
    default="127.0.0.1:0",
    help="HOST:PORT of the agent's talkback endpoint (port 0: any free port); 'off': none.",
)
@click.option(
    "--talkback-token",
    default=None,
    help="Bearer token of the talkback endpoint (default: random per start).",
)
@click.option(
    "--dns-name",
    default=None,
    help="DNS alias of the masters: SRV _herder._tcp.NAME, else its A/AAAA records "
    "(port 6240). Tried after --master.",
)
@click.option(
    "--resolver", default=None, help="HOST:PORT of the DNS server to ask (default: the system's)."
)
@click.option(
    "--srv/--no-srv",
    default=None,
    help="Only SRV records (--srv) or only A/AAAA (--no-srv); default: SRV, then A/AAAA.",
)
@click.option(
    "--backoff-max",
    type=click.FloatRange(min=0.1),
    default=30.0,
    help="Cap (seconds) of the exponential backoff when every master is down.",
)
@click.option(
    "--self-assign/--no-self-assign",
    default=False,
    help="When every master is down, claim work from the database itself (needs --db).",
)
@click.option(
    "--db",
    envvar="HERDER_AGENT_DB",
    default=None,
    help="The farm's database URL, for self-assignment (autonomous mode).",
)
@click.option(
    "--return-policy",
    default="per-task",
    help="Autonomous → master mode: per-task (probe the masters before each claim), "
    "interval:SECONDS, or never (until talkback `mode` or SIGUSR1).",
)
@click.option(
    "--claim-ahead",
    type=click.IntRange(min=0),
    envvar="HERDER_CLAIM_AHEAD",
    default=None,
    help="Offers claimed beyond the slots while tasks are short (DESIGN §10); "
    "0: off (default: 32 times slots, at most 64).",
)
@click.option(
    "--rehome",
    type=float,
    default=60.0,
    help="Every this many seconds start again from the first master candidate "
    "(moves back to the first --master once it returns); 0: never.",
)
@click.option(
    "--direct-listen",
    default=None,
    help="HOST:PORT to serve direct execution on (DESIGN §9, `herder run --direct`); "
    "with no --master or --dns-name the agent serves only direct work.",
)
@click.option(
    "--direct-allow",
    default="127.0.0.0/8,::1",
    show_default=True,
    help="Client networks allowed to use the direct listener, comma-separated.",
)
@click.option(
    "--direct-token",
    envvar="HERDER_DIRECT_TOKEN",
    default=None,
    help="Shared token direct clients must send (Authorization: Bearer).",
)
@click.option(
    "--direct-surcharge",
    type=click.FloatRange(min=0),
    default=0.0,
    help="Added to this agent's direct cost (commands handled over slots): prefer others.",
)
@click.option(
    "--accept-owners",
    default="",
    help="Only take tasks of jobs of these owners, comma-separated (default: everyone's).",
)
@click.option(
    "--accept-pools",
    default="",
    help="Only take tasks of jobs in these pools, comma-separated (default: every pool).",
)
@click.option("--gpus", type=click.IntRange(min=0, max=1024), default=0, help="GPUs tasks may use.")
@click.option(
    "--max-ram-mb",
    type=click.IntRange(min=1),
    default=None,
    help="The most RAM the farm's tasks may reserve here (default: all of it); "
    "changeable at run time: PATCH /api/v1/agents/ID.",
)
@click.option(
    "--max-load",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Take no new task while the 1-minute load average is at least this (default: no limit).",
)
@tls_server_opts
@join_token_opt
def agent(
    master: str | None,
    slots: int,
    tags: str,
    name: str | None,
    state_dir: Path | None,
    drain_timeout: float,
    log_level: str,
    talkback: str,
    talkback_token: str | None,
    dns_name: str | None,
    resolver: str | None,
    srv: bool | None,
    backoff_max: float,
    self_assign: bool,
    db: str | None,
    return_policy: str,
    claim_ahead: int | None,
    rehome: float,
    direct_listen: str | None,
    direct_allow: str,
    direct_token: str | None,
    direct_surcharge: float,
    accept_owners: str,
    accept_pools: str,
    gpus: int,
    max_ram_mb: int | None,
    max_load: float | None,
    tls_cert: str | None,
    tls_key: str | None,
) -> None:
    """Run an agent: claim tasks from the masters and run them in sandboxes.

    --tls-cert/--tls-key: HTTPS on the talkback and direct listeners; --ca
    verifies https:// masters (default: $HERDER_CA, else the system trust store).

    Masters come from --master, then --dns-name (via --resolver), then the master
    directory. With --self-assign and --db the agent claims from the database
    while every master is down; SIGUSR1 (or talkback `mode`) sends it back.
    """
    from herder.agent.daemon import AgentConfig, run_agent
    from herder.logsetup import setup_logging

    setup_logging(log_level)
    from herder.agent.autonomous import ReturnPolicy

    if self_assign and not db:
        _fail("--self-assign needs --db (the farm's database URL)")
    check_server_tls(tls_cert, tls_key)
    try:
        ReturnPolicy.parse(return_policy)
    except ValueError as exc:
        _fail(f"--return-policy: {exc}")
    if master is None and not dns_name and not direct_listen:
        master = "http://127.0.0.1:6240"
    kwargs: dict[str, Any] = {
        "masters": _masters(master) if master else [],
        "dns_name": dns_name,
        "resolver": resolver,
        "srv": srv,
        "backoff_max_s": backoff_max,
        "self_assign": self_assign,
        "db_url": db,
        "return_policy": return_policy,
        "rehome_s": rehome,
        "slots": slots or os.cpu_count() or 1,
        "tags": [t.strip() for t in tags.split(",") if t.strip()],
        "drain_timeout_s": drain_timeout,
        "claim_ahead": claim_ahead,
        "gpus": gpus,
        "max_ram_mb": max_ram_mb,
        "max_load": max_load,
    }
    from herder.api_models import agent_tags_problem

    problem = agent_tags_problem(kwargs["tags"])
    if problem is not None:
        _fail(f"--tags: {problem}", 2)
    from herder.core.acl import normalize_accept, parse_names

    for opt, text in (("accept_owners", accept_owners), ("accept_pools", accept_pools)):
        try:
            kwargs[opt] = normalize_accept(parse_names(text, "name"))
        except ValueError as exc:
            _fail(f"--{opt.replace('_', '-')}: {exc}", 2)
    if name:
        kwargs["name"] = name
    if state_dir is not None:
        kwargs["state_dir"] = state_dir
    if talkback.strip().lower() in ("off", "none", ""):
        kwargs["talkback"] = None
    else:
        from herder.agent.talkback import parse_bind

        try:
            parse_bind(talkback)
        except ValueError as exc:
            _fail(str(exc))
        kwargs["talkback"] = talkback
    if talkback_token is not None:
        if len(talkback_token) < 16:
            _fail("--talkback-token: at least 16 characters")
        kwargs["talkback_token"] = talkback_token
    if direct_listen:
        from herder.agent.direct import DirectConfig, parse_allow
        from herder.agent.talkback import parse_bind

        try:
            parse_bind(direct_listen)
            parse_allow(direct_allow)
        except ValueError as exc:
            _fail(str(exc).replace("talkback address", "--direct-listen"), 2)
        if direct_token is not None and len(direct_token) < 16:
            _fail("--direct-token: at least 16 characters", 2)
        kwargs["direct"] = DirectConfig(
            bind=direct_listen,
            slots=kwargs["slots"],
            surcharge=direct_surcharge,
            allow=direct_allow,
            token=direct_token,
            tls_cert=tls_cert,
            tls_key=tls_key,
        )
    kwargs["tls_cert"], kwargs["tls_key"] = tls_cert, tls_key
    try:
        config = AgentConfig(**kwargs)
    except ValueError as exc:
        _fail(str(exc), 2)
    raise Exit(run_agent(config))
