"""The `herder` command line."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from rich.console import Console


class Exit(click.exceptions.Exit):
    """Leave the command with an exit status (click's, so a test runner sees it too)."""


class _Group(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.commands)  # in the order they are defined


@click.group(
    cls=_Group,
    name="herder",
    help="herder: a distributed job farm. Run a master, agents, and submit jobs.",
    context_settings={"help_option_names": ["-h", "--help"], "show_default": True},
)
def app() -> None:
    pass


_console: Console | None = None


def console() -> Console:
    """Rich is imported only by the commands that print tables or live progress."""
    global _console
    if _console is None:
        from rich.console import Console

        _console = Console()
    return _console


def _table(*columns: str) -> Any:
    from rich.table import Table

    return Table(*columns)


DEFAULT_MASTER = "http://127.0.0.1:6240"
master_opt = click.option(
    "--master",
    "-m",
    envvar="HERDER_MASTER",
    default=DEFAULT_MASTER,
    help="Master URL(s), comma-separated.",
)
inspect_master_opt = click.option(
    "--master",
    "-m",
    envvar="HERDER_MASTER",
    default=None,
    help="Master URL(s), comma-separated. Without it: the state `herder run` left in "
    "./.herder, else http://127.0.0.1:6240.",
)


def _masters(value: str) -> list[str]:
    urls = [u.strip().rstrip("/") for u in value.split(",") if u.strip()]
    if not urls:
        raise click.BadParameter("no master URL given")
    return urls


def _fail(message: str, code: int = 1) -> None:
    # Plain write: an error is one line, never wrapped to the terminal width.
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise Exit(code)


def _parse_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise click.BadParameter(f"expected HOST:PORT, got {listen!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


@app.command()
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
def master(
    db: str,
    listen: str,
    lease: float,
    ack_timeout: float,
    log_level: str,
    advertise_url: str | None,
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
            raise click.BadParameter(str(exc), param_hint="--advertise-url") from None
    serve(db, host, port, lease_s=lease, ack_timeout_s=ack_timeout, advertise_url=advertise_url)


@app.command()
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
        "claim_ahead": claim_ahead,
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
    try:
        config = AgentConfig(**kwargs)
    except ValueError as exc:
        _fail(str(exc), 2)
    raise Exit(run_agent(config))


@contextlib.contextmanager
def _client(master: str | None) -> Iterator[Any]:
    """A client for --master, or for the embedded farm state of `herder run`."""
    state = Path.cwd() / ".herder"
    if not master and (state / "herder.db").is_file():
        # The saved state of `herder run`: read it in this process, through the
        # same service and store a master uses (no master process to start).
        from herder.embedded import inspect_state

        local, store = inspect_state(state)
        try:
            yield local
        finally:
            store.close()
        return
    from herder.client import HerderClient

    urls = _masters(master) if master else [DEFAULT_MASTER]
    with HerderClient(urls) as client:
        yield client


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
@click.argument("jobfile", type=click.Path(path_type=Path))
@master_opt
@click.option("--wait/--no-wait", default=False, help="Wait for the job to finish.")
def submit(jobfile: Path, master: str, wait: bool) -> None:
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
        console().print(f"job {job.id} {job.state} {job.href}", highlight=False)
        if wait:
            # The follow stream answers as soon as anything happens: no polling interval.
            state, after = job.state, 0
            while state not in ("succeeded", "failed", "cancelled"):
                page = _call(client.follow_job, job.id, after, wait_s=20.0)
                state, after = page.state, page.next
            console().print(f"job {job.id} {state}", highlight=False)
            if state != "succeeded":
                raise Exit(1)


@app.command()
@click.argument("job_id", type=int, required=False)
@inspect_master_opt
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def status(job_id: int | None, master: str | None, as_json: bool) -> None:
    """Show jobs, or one job with its stages and tasks."""
    with _client(master) as client:
        if job_id is None:
            jobs = _call(client.list_jobs)
            if as_json:
                print(json.dumps([j.model_dump(mode="json") for j in jobs], indent=2))
                return
            table = _table("id", "name", "state", "tasks", "created")
            for j in jobs:
                counts = " ".join(f"{k}={v}" for k, v in sorted(j.counts.items()) if v)
                table.add_row(str(j.id), j.name, j.state, counts, j.created_at.isoformat())
            console().print(table)
            return
        job = _call(client.get_job, job_id)
        if as_json:
            print(job.model_dump_json(indent=2))
            return
        console().print(f"job {job.id} [bold]{job.name}[/bold]: {job.state}", highlight=False)
        for stage in job.stages:
            counts = " ".join(f"{k}={v}" for k, v in sorted(stage.counts.items()) if v)
            console().print(
                f"  stage {stage.index} {stage.name}: {stage.state} ({counts})", highlight=False
            )
            for task in stage.tasks:
                extra = f" exit={task.exit_code}" if task.exit_code is not None else ""
                extra += f" error={task.error}" if task.error else ""
                console().print(
                    f"    task {task.id} {task.name or ''} {task.state}{extra}", highlight=False
                )


@app.command()
@click.argument("job_id", type=int)
@click.argument("task_id", type=int, required=False)
@inspect_master_opt
@click.option("--follow", "-f", is_flag=True, help="Keep printing new output.")
def logs(job_id: int, task_id: int | None, master: str | None, follow: bool) -> None:
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
@click.argument("job_id", type=int)
@inspect_master_opt
def cancel(job_id: int, master: str | None) -> None:
    """Cancel a job: its queued tasks never start, running ones are stopped."""
    with _client(master) as client:
        job = _call(client.cancel_job, job_id)
        console().print(f"job {job.id} {job.state}", highlight=False)


@app.command()
@inspect_master_opt
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def agents(master: str | None, as_json: bool) -> None:
    """List the agents registered with the farm and their resource usage."""
    with _client(master) as client:
        items = _call(client.list_agents)
        if as_json:
            print(json.dumps([a.model_dump(mode="json") for a in items], indent=2))
            return
        table = _table(
            "id", "name", "host", "state", "slots", "running", "load", "ram", "last seen"
        )
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
        console().print(table)


@app.command()
@click.argument("agent_id")
@master_opt
@click.option("--undo", is_flag=True, help="Undrain: let the agent take new work again.")
def drain(agent_id: str, master: str, undo: bool) -> None:
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
        console().print(f"agent {view.id} {view.state}", highlight=False)


@app.command()
@click.argument("rakefile", type=click.Path(path_type=Path), default="Rakefile")
@click.option(
    "--master",
    "-m",
    envvar="HERDER_MASTER",
    default=None,
    help="Submit to this farm instead of an embedded one.",
)
@click.option(
    "--slots",
    type=click.IntRange(min=0),
    default=0,
    help="Embedded farm: agent slots (0: CPU count).",
)
@click.option(
    "--chdir",
    "-C",
    type=click.Path(path_type=Path),
    default=None,
    help="Working directory (default: the current one).",
)
@click.option("--plain", is_flag=True, help="Line output even on a terminal.")
def run(rakefile: Path, master: str | None, slots: int, chdir: Path | None, plain: bool) -> None:
    """Build a Rakefile: actionsets in order, the actions of each in parallel."""
    from herder.build import Build, BuildError, PlainReporter, Reporter, RichReporter
    from herder.client.errors import ApiError, HerderClientError, NoMasterAvailable
    from herder.rakefile import RakefileError, load_rakefile

    try:
        parsed = load_rakefile(rakefile)
    except RakefileError as exc:
        print(str(exc), file=sys.stderr, flush=True)
        raise Exit(2) from None
    except OSError as exc:
        print(f"{rakefile}: cannot read: {exc.strerror or exc}", file=sys.stderr, flush=True)
        raise Exit(2) from None
    workdir = (chdir or Path.cwd()).resolve()
    if not workdir.is_dir():
        _fail(f"working directory {workdir} does not exist", 2)
    ok = False
    with _stop_on_signals():
        farm: Any = None
        client: Any = None
        try:
            if master:
                from herder.client import HerderClient

                client = HerderClient(_masters(master))
            else:
                from herder.embedded import EmbeddedFarm, StateDirBusy

                try:
                    farm = EmbeddedFarm(workdir / ".herder", slots or os.cpu_count() or 1)
                except StateDirBusy as exc:
                    _fail(str(exc), 2)
                client = farm.client()
            reporter: Reporter = (
                RichReporter() if sys.stdout.isatty() and not plain else PlainReporter()
            )
            build = Build(client, parsed, workdir, reporter, name=str(rakefile))
            try:
                ok = build.run()
            except BuildError as exc:
                _fail(f"{rakefile}: {exc}", 2)
            except (ApiError, NoMasterAvailable, HerderClientError) as exc:
                where = f" (embedded farm log: {workdir / '.herder' / 'logs' / 'farm.log'})"
                _fail(f"farm error: {exc}{where if farm is not None else ''}")
        finally:
            if client is not None:
                client.close()
            if farm is not None:
                # Nothing runs any more (a failed build cancelled its job): stop now.
                farm.close(at_once=True)
    raise Exit(0 if ok else 1)


class _Stopped(BaseException):
    """SIGTERM or SIGHUP: unwind like Ctrl-C, so the embedded farm stops with us."""


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[None]:
    import signal

    def stop(signum: int, _frame: Any) -> None:
        raise _Stopped(signal.Signals(signum).name)

    old = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    except (_Stopped, KeyboardInterrupt) as exc:
        name = str(exc) or "SIGINT"
        print(f"herder run: stopped by {name}", file=sys.stderr, flush=True)
        raise Exit(130 if name == "SIGINT" else 143) from None
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def main() -> None:
    app(prog_name="herder")


if __name__ == "__main__":
    main()
