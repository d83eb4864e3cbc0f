"""The `herder` command line."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    name="herder",
    help="herder: a distributed job farm. Run a master, agents, and submit jobs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()

MasterOpt = Annotated[
    str,
    typer.Option("--master", "-m", envvar="HERDER_MASTER", help="Master URL(s), comma-separated."),
]
InspectMasterOpt = Annotated[
    str | None,
    typer.Option(
        "--master",
        "-m",
        envvar="HERDER_MASTER",
        help="Master URL(s), comma-separated. Without it: the state `herder run` left in "
        "./.herder, else http://127.0.0.1:6240.",
    ),
]
DEFAULT_MASTER = "http://127.0.0.1:6240"


def _masters(value: str) -> list[str]:
    urls = [u.strip().rstrip("/") for u in value.split(",") if u.strip()]
    if not urls:
        raise typer.BadParameter("no master URL given")
    return urls


def _fail(message: str, code: int = 1) -> None:
    # Plain write: an error is one line, never wrapped to the terminal width.
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise typer.Exit(code)


def _parse_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise typer.BadParameter(f"expected HOST:PORT, got {listen!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


@app.command()
def master(
    db: Annotated[
        str,
        typer.Option(
            "--db",
            envvar="HERDER_DB",
            help="Database URL: sqlite:///path.db or postgresql+psycopg://user@host/db",
        ),
    ] = "sqlite:///herder.db",
    listen: Annotated[str, typer.Option(help="HOST:PORT to listen on.")] = "127.0.0.1:6240",
    lease: Annotated[float, typer.Option(help="Lease length in seconds.")] = 30.0,
    ack_timeout: Annotated[float, typer.Option(help="Seconds an offer waits for its ack.")] = 30.0,
    log_level: Annotated[str, typer.Option(help="debug, info, warning, error")] = "info",
    advertise_url: Annotated[
        str | None,
        typer.Option(
            "--advertise-url",
            envvar="HERDER_ADVERTISE_URL",
            help="The URL agents use to reach this master, listed in the master directory "
            "(default: http://<listen host>:<port>).",
        ),
    ] = None,
) -> None:
    """Run a master: the HTTP API over the job queue in the database."""
    from herder.logsetup import setup_logging
    from herder.master.server import serve

    setup_logging(log_level)
    host, port = _parse_listen(listen)
    if advertise_url is not None:
        from herder.master.server import normalize_advertise_url

        try:
            advertise_url = normalize_advertise_url(advertise_url)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--advertise-url") from None
    serve(db, host, port, lease_s=lease, ack_timeout_s=ack_timeout, advertise_url=advertise_url)


@app.command()
def agent(
    master: Annotated[
        str | None,
        typer.Option(
            "--master",
            "-m",
            envvar="HERDER_MASTER",
            help="Master URL(s), comma-separated, tried first in this order "
            "(default: http://127.0.0.1:6240 unless --dns-name is given).",
        ),
    ] = None,
    slots: Annotated[int, typer.Option(min=1, help="Tasks run at once (default: CPU count).")] = 0,
    tags: Annotated[str, typer.Option(help="Comma-separated tags this agent offers.")] = "",
    name: Annotated[str | None, typer.Option(help="Agent name (default: hostname).")] = None,
    state_dir: Annotated[
        Path | None, typer.Option(help="Where the agent keeps its id, blob cache and sandboxes.")
    ] = None,
    drain_timeout: Annotated[
        float, typer.Option(help="Seconds to let running tasks finish on SIGTERM.")
    ] = 30.0,
    log_level: Annotated[str, typer.Option(help="debug, info, warning, error")] = "info",
    talkback: Annotated[
        str,
        typer.Option(
            help="HOST:PORT of the agent's talkback endpoint (port 0: any free port); 'off': none."
        ),
    ] = "127.0.0.1:0",
    talkback_token: Annotated[
        str | None,
        typer.Option(help="Bearer token of the talkback endpoint (default: random per start)."),
    ] = None,
    dns_name: Annotated[
        str | None,
        typer.Option(
            "--dns-name",
            help="DNS alias of the masters: SRV _herder._tcp.NAME, else its A/AAAA records "
            "(port 6240). Tried after --master.",
        ),
    ] = None,
    resolver: Annotated[
        str | None,
        typer.Option(
            "--resolver", help="HOST:PORT of the DNS server to ask (default: the system's)."
        ),
    ] = None,
    srv: Annotated[
        bool | None,
        typer.Option(
            "--srv/--no-srv",
            help="Only SRV records (--srv) or only A/AAAA (--no-srv); default: SRV, then A/AAAA.",
        ),
    ] = None,
    backoff_max: Annotated[
        float,
        typer.Option(
            "--backoff-max",
            min=0.1,
            help="Cap (seconds) of the exponential backoff when every master is down.",
        ),
    ] = 30.0,
    self_assign: Annotated[
        bool,
        typer.Option(
            "--self-assign/--no-self-assign",
            help="When every master is down, claim work from the database itself (needs --db).",
        ),
    ] = False,
    db: Annotated[
        str | None,
        typer.Option(
            "--db",
            envvar="HERDER_AGENT_DB",
            help="The farm's database URL, for self-assignment (autonomous mode).",
        ),
    ] = None,
    return_policy: Annotated[
        str,
        typer.Option(
            "--return-policy",
            help="Autonomous → master mode: per-task (probe the masters before each claim), "
            "interval:SECONDS, or never (until talkback `mode` or SIGUSR1).",
        ),
    ] = "per-task",
    rehome: Annotated[
        float,
        typer.Option(
            "--rehome",
            help="Every this many seconds start again from the first master candidate "
            "(moves back to the first --master once it returns); 0: never.",
        ),
    ] = 60.0,
) -> None:
    """Run an agent: claim tasks from the masters and run them in sandboxes.

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
    try:
        ReturnPolicy.parse(return_policy)
    except ValueError as exc:
        _fail(f"--return-policy: {exc}")
    if master is None and not dns_name:
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
    }
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
    raise typer.Exit(run_agent(AgentConfig(**kwargs)))


@contextlib.contextmanager
def _client(master: str | None) -> Iterator[Any]:
    """A client for --master, or for the embedded farm state of `herder run`."""
    from herder.client import HerderClient

    farm = None
    state = Path.cwd() / ".herder" / "herder.db"
    if master:
        urls = _masters(master)
    elif state.is_file():
        from herder.localfarm import LocalFarm

        # Serve the saved state with a short-lived master: the CLI keeps
        # talking HTTP through the one client library, whatever the source.
        farm = LocalFarm(db_url=f"sqlite:///{state}")
        farm.start_master()
        urls = [farm.url]
    else:
        urls = [DEFAULT_MASTER]
    try:
        with HerderClient(urls) as client:
            yield client
    finally:
        if farm is not None:
            farm.close()


def _call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    from herder.client import ApiError, NoMasterAvailable

    try:
        return fn(*args, **kwargs)
    except ApiError as exc:
        _fail(f"{exc.code}: {exc.message}")
    except NoMasterAvailable as exc:
        _fail(f"no master reachable: {exc}")
    return None


@app.command()
def submit(
    jobfile: Annotated[Path, typer.Argument(help="A job as JSON (the API's JobSubmit) or TOML.")],
    master: MasterOpt = "http://127.0.0.1:6240",
    wait: Annotated[bool, typer.Option(help="Wait for the job to finish.")] = False,
) -> None:
    """Submit a job file to a master and print its id."""
    from pydantic import ValidationError

    from herder.api_models import JobSubmit
    from herder.submit import prepare_jobfile

    try:
        spec = prepare_jobfile(jobfile)
    except (OSError, ValueError) as exc:
        _fail(str(exc), 2)
        return
    except ValidationError as exc:
        _fail(f"{jobfile}: {exc}", 2)
        return
    assert isinstance(spec.job, JobSubmit)
    import uuid

    # A fresh idempotency key per invocation (unless the job file sets one):
    # the client resends the submission after an ambiguous failure, and the
    # master answers a resend with the same job, never a second one.
    job_spec = spec.job
    if job_spec.idempotency_key is None:
        job_spec = job_spec.model_copy(update={"idempotency_key": f"cli-{uuid.uuid4()}"})
    with _client(master) as client:
        _call(spec.upload, client)
        job = _call(client.submit_job, job_spec)
        console.print(f"job {job.id} {job.state} {job.href}", highlight=False)
        if wait:
            while job.state not in ("succeeded", "failed", "cancelled"):
                time.sleep(0.5)
                job = _call(client.get_job, job.id)
            console.print(f"job {job.id} {job.state}", highlight=False)
            if job.state != "succeeded":
                raise typer.Exit(1)


@app.command()
def status(
    job_id: Annotated[
        int | None, typer.Argument(help="A job id; all recent jobs without it.")
    ] = None,
    master: InspectMasterOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show jobs, or one job with its stages and tasks."""
    with _client(master) as client:
        if job_id is None:
            jobs = _call(client.list_jobs)
            if as_json:
                print(json.dumps([j.model_dump(mode="json") for j in jobs], indent=2))
                return
            table = Table("id", "name", "state", "tasks", "created")
            for j in jobs:
                counts = " ".join(f"{k}={v}" for k, v in sorted(j.counts.items()) if v)
                table.add_row(str(j.id), j.name, j.state, counts, j.created_at.isoformat())
            console.print(table)
            return
        job = _call(client.get_job, job_id)
        if as_json:
            print(job.model_dump_json(indent=2))
            return
        console.print(f"job {job.id} [bold]{job.name}[/bold]: {job.state}", highlight=False)
        for stage in job.stages:
            counts = " ".join(f"{k}={v}" for k, v in sorted(stage.counts.items()) if v)
            console.print(
                f"  stage {stage.index} {stage.name}: {stage.state} ({counts})", highlight=False
            )
            for task in stage.tasks:
                extra = f" exit={task.exit_code}" if task.exit_code is not None else ""
                extra += f" error={task.error}" if task.error else ""
                console.print(
                    f"    task {task.id} {task.name or ''} {task.state}{extra}", highlight=False
                )


@app.command()
def logs(
    job_id: Annotated[int, typer.Argument(help="The job.")],
    task_id: Annotated[int | None, typer.Argument(help="One task of it (all without it).")] = None,
    master: InspectMasterOpt = None,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing new output.")
    ] = False,
) -> None:
    """Print the stdout and stderr of a job's tasks (their latest attempts)."""
    offsets: dict[tuple[int, str], int] = {}
    with _client(master) as client:
        while True:
            job = _call(client.get_job, job_id)
            for stage in job.stages:
                for task in stage.tasks:
                    if task_id is not None and task.id != task_id:
                        continue
                    if not task.attempts:
                        continue
                    attempt = task.attempts[-1]
                    for stream in ("stdout", "stderr"):
                        key = (attempt.id, stream)
                        chunk = _call(client.read_log, attempt.id, stream, offsets.get(key, 0))
                        offsets[key] = chunk.next_offset
                        out = sys.stdout if stream == "stdout" else sys.stderr
                        for line in chunk.data.splitlines():
                            print(f"[{task.name or task.id}] {line}", file=out)
            if not follow or job.state in ("succeeded", "failed", "cancelled"):
                return
            time.sleep(0.5)


@app.command()
def cancel(
    job_id: Annotated[int, typer.Argument(help="The job to cancel.")],
    master: InspectMasterOpt = None,
) -> None:
    """Cancel a job: its queued tasks never start, running ones are stopped."""
    with _client(master) as client:
        job = _call(client.cancel_job, job_id)
        console.print(f"job {job.id} {job.state}", highlight=False)


@app.command()
def agents(
    master: InspectMasterOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List the agents registered with the farm and their resource usage."""
    with _client(master) as client:
        items = _call(client.list_agents)
        if as_json:
            print(json.dumps([a.model_dump(mode="json") for a in items], indent=2))
            return
        table = Table("id", "name", "host", "state", "slots", "running", "load", "ram", "last seen")
        for a in items:
            u = a.usage
            load = f"{u.load_1m:.2f}" if u and u.load_1m is not None else ""
            ram = (
                f"{u.ram_used_mb:.0f}/{u.ram_total_mb:.0f} MB"
                if u and u.ram_used_mb and u.ram_total_mb
                else ""
            )
            seen = a.last_seen_at.isoformat() if a.last_seen_at else ""
            table.add_row(
                a.id, a.name, a.hostname, a.state, str(a.slots), str(a.running), load, ram, seen
            )
        console.print(table)


@app.command()
def drain(
    agent_id: Annotated[str, typer.Argument(help="The agent to drain (see `herder agents`).")],
    master: MasterOpt = "http://127.0.0.1:6240",
    undo: Annotated[
        bool, typer.Option("--undo", help="Undrain: let the agent take new work again.")
    ] = False,
) -> None:
    """Drain an agent: no new work; it exits once its running tasks are done and reported."""
    from herder.api_models import AgentView

    action = "undrain" if undo else "drain"
    with _client(master) as client:
        view = _call(
            client._call,  # no HerderClient method for it yet: the generic request loop
            AgentView,
            "POST",
            f"/agents/{agent_id}/{action}",
            idempotent=True,
        )
        console.print(f"agent {view.id} {view.state}", highlight=False)


@app.command()
def run(
    rakefile: Annotated[Path, typer.Argument(help="The Rakefile to build.")] = Path("Rakefile"),
    master: Annotated[
        str | None,
        typer.Option(
            "--master",
            "-m",
            envvar="HERDER_MASTER",
            help="Submit to this farm instead of an embedded one.",
        ),
    ] = None,
    slots: Annotated[
        int, typer.Option(min=0, help="Embedded farm: agent slots (default: CPU count).")
    ] = 0,
    chdir: Annotated[
        Path | None,
        typer.Option("--chdir", "-C", help="Working directory (default: the current one)."),
    ] = None,
    plain: Annotated[bool, typer.Option(help="Line output even on a terminal.")] = False,
) -> None:
    """Build a Rakefile: actionsets in order, the actions of each in parallel."""
    from herder.build import Build, BuildError, PlainReporter, Reporter, RichReporter, embedded_farm
    from herder.client import ApiError, HerderClient, NoMasterAvailable
    from herder.rakefile import RakefileError, load_rakefile

    try:
        parsed = load_rakefile(rakefile)
    except RakefileError as exc:
        print(str(exc), file=sys.stderr, flush=True)
        raise typer.Exit(2) from None
    except OSError as exc:
        print(f"{rakefile}: cannot read: {exc.strerror or exc}", file=sys.stderr, flush=True)
        raise typer.Exit(2) from None
    workdir = (chdir or Path.cwd()).resolve()
    if not workdir.is_dir():
        _fail(f"working directory {workdir} does not exist", 2)
    farm = None
    try:
        if master:
            urls = _masters(master)
        else:
            farm, url = embedded_farm(slots or os.cpu_count() or 1, workdir / ".herder")
            urls = [url]
        reporter: Reporter = (
            RichReporter() if console.is_terminal and not plain else PlainReporter()
        )
        with HerderClient(urls) as client:
            build = Build(client, parsed, workdir, reporter, name=str(rakefile))
            try:
                ok = build.run()
            except BuildError as exc:
                _fail(f"{rakefile}: {exc}", 2)
            except (ApiError, NoMasterAvailable) as exc:
                where = f" (embedded farm logs: {workdir / '.herder' / 'logs'})" if farm else ""
                _fail(f"farm error: {exc}{where}")
    finally:
        if farm is not None:
            # Nothing runs any more (a failed build cancelled its job): stop together.
            farm.close(at_once=True)  # type: ignore[attr-defined]
    raise typer.Exit(0 if ok else 1)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
