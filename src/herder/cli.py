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

from herder.cli_acl import pool as pool_group
from herder.cli_auth import token as token_group
from herder.cli_auth import token_opt
from herder.cli_auth import user as user_group
from herder.cli_certs import certs as certs_group
from herder.cli_common import Exit, _fail, _masters
from herder.cli_daemons import agent as daemon_agent
from herder.cli_daemons import master as daemon_master
from herder.cli_farm import farm_client as _http_client
from herder.cli_farm import master_timeout_opt, no_wait_opt
from herder.cli_farm import no_master as _no_master
from herder.cli_jobs import job as job_group
from herder.cli_run import (
    _bad_input,
    _check_requires,
    _checked_build,
    _job_name,
    _run_direct,
    _stop_on_signals,
    _stop_reporter,
)
from herder.cli_sched import limit as limit_command
from herder.cli_sched import share as share_command
from herder.display import markup_safe, printable

if TYPE_CHECKING:
    from rich.console import Console


class _Group(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.commands)  # in the order they are defined


@click.group(
    cls=_Group,
    name="herder",
    help="herder: a distributed job farm. Run a master, agents, and submit jobs.",
    context_settings={"help_option_names": ["-h", "--help"], "show_default": True},
)
@no_wait_opt
@token_opt
def app() -> None:
    pass


app.add_command(daemon_master)
app.add_command(daemon_agent)
app.add_command(job_group)
app.add_command(pool_group)
app.add_command(share_command)
app.add_command(limit_command)
app.add_command(user_group)
app.add_command(token_group)
app.add_command(certs_group)

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


@contextlib.contextmanager
def _client(master: str | None, master_timeout: str | None = None) -> Iterator[Any]:
    """A client for --master, or for the embedded farm state of `herder run`."""
    from herder.cli_farm import outage_policy

    outage_policy(master_timeout)  # a bad value is an error even where no master is asked
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
    client = _http_client(_masters(master) if master else [DEFAULT_MASTER], master_timeout)
    try:
        yield client
    finally:
        client.close()


def _call(fn: Any, *args: Any, _job: int | None = None, **kwargs: Any) -> Any:
    """Call the client; an error answer or no master is a clear message (``_job``: named in it)."""
    from herder.client import ApiError, NoMasterAvailable

    try:
        return fn(*args, **kwargs)
    except ApiError as exc:
        _fail(f"{exc.code}: {exc.message}")  # _fail makes the farm's text printable
    except NoMasterAvailable as exc:
        _no_master(exc, _job)
    return None


@app.command()
@click.argument("jobfile", type=click.Path(path_type=Path))
@master_opt
@click.option("--wait/--no-wait", default=False, help="Wait for the job to finish.")
@click.option(
    "--depends-on",
    "depends_on",
    type=click.IntRange(min=1),
    multiple=True,
    metavar="JOB_ID",
    help="A job that must succeed before this one starts (repeatable; added to the "
    "job file's depends_on).",
)
@click.option(
    "--on-parent-failure",
    type=click.Choice(["fail", "hold"]),
    default=None,
    help="When a job it depends on fails: fail too, or hold until that job is retried "
    "and succeeds (default: the job file's, else fail).",
)
@master_timeout_opt
def submit(
    jobfile: Path,
    master: str,
    wait: bool,
    depends_on: tuple[int, ...],
    on_parent_failure: str | None,
    master_timeout: str | None,
) -> None:
    """Submit a job file to a master and print its id.

    Exit status: 0 submitted (with --wait: succeeded), 1 the job failed or the
    farm refused it, 2 a bad job file (one line ``file:line:col: message``,
    nothing submitted), 75 no master answered within --master-timeout.
    """
    from herder.api_models import JobSubmit
    from herder.submit import JobFileError, prepare_jobfile

    try:
        spec = prepare_jobfile(jobfile)
    except JobFileError as exc:
        _bad_input(str(exc))
    assert isinstance(spec.job, JobSubmit)
    import uuid

    # A fresh idempotency key per invocation (unless the job file sets one):
    # the client resends the submission after an ambiguous failure, and the
    # master answers a resend with the same job, never a second one.
    job_spec = spec.job
    if job_spec.idempotency_key is None:
        job_spec = job_spec.model_copy(update={"idempotency_key": f"cli-{uuid.uuid4()}"})
    from herder.cli_jobs import with_parents

    job_spec = with_parents(job_spec, depends_on, on_parent_failure)
    from herder.client.errors import HerderClientError

    with _client(master, master_timeout) as client:
        try:  # the job is created waiting; the files it lacks are uploaded (issue 10)
            job = _call(spec.submit, client, job_spec)
        except HerderClientError as exc:  # e.g. a required file changed since it was hashed
            _fail(str(exc))
        console().print(
            f"job {job.id} {job.state} {printable(job.href)}", highlight=False, markup=False
        )
        if wait:
            # The follow stream answers as soon as anything happens: no polling interval.
            state, after = job.state, 0
            while state not in ("succeeded", "failed", "cancelled"):
                page = _call(client.follow_job, job.id, after, wait_s=20.0, _job=job.id)
                state, after = page.state, page.next
            console().print(f"job {job.id} {state}", highlight=False)
            if state != "succeeded":
                raise Exit(1)


@app.command()
@click.argument("job_id", type=int, required=False)
@inspect_master_opt
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@master_timeout_opt
def status(
    job_id: int | None, master: str | None, as_json: bool, master_timeout: str | None
) -> None:
    """Show jobs, or one job with its stages and tasks."""
    with _client(master, master_timeout) as client:
        if job_id is None:
            jobs = _call(client.list_jobs)
            if as_json:
                print(json.dumps([j.model_dump(mode="json") for j in jobs], indent=2))
                return
            table = _table("id", "name", "state", "tasks", "created")
            for j in jobs:
                counts = " ".join(f"{k}={v}" for k, v in sorted(j.counts.items()) if v)
                table.add_row(
                    str(j.id), markup_safe(j.name), j.state, counts, j.created_at.isoformat()
                )
            console().print(table)
            return
        job = _call(client.get_job, job_id, _job=job_id)
        if as_json:
            print(job.model_dump_json(indent=2))
            return
        console().print(
            f"job {job.id} [bold]{markup_safe(job.name)}[/bold]: {job.state}", highlight=False
        )
        from herder.cli_jobs import relation_lines

        for line in relation_lines(job):
            console().print(line, highlight=False, markup=False)
        for stage in job.stages:
            counts = " ".join(f"{k}={v}" for k, v in sorted(stage.counts.items()) if v)
            console().print(
                f"  stage {stage.index} {printable(stage.name)}: {stage.state} ({counts})",
                highlight=False,
                markup=False,
            )
            for task in stage.tasks:
                extra = f" exit={task.exit_code}" if task.exit_code is not None else ""
                extra += f" error={task.error}" if task.error else ""
                extra += f" progress={task.progress:g}%" if task.progress is not None else ""
                console().print(
                    printable(f"    task {task.id} {task.name or ''} {task.state}{extra}"),
                    highlight=False,
                    markup=False,
                )


@app.command()
@click.argument("job_id", type=int)
@click.argument("task_id", type=int, required=False)
@inspect_master_opt
@click.option("--follow", "-f", is_flag=True, help="Keep printing new output.")
@master_timeout_opt
def logs(
    job_id: int, task_id: int | None, master: str | None, follow: bool, master_timeout: str | None
) -> None:
    """Print the stdout and stderr of a job's tasks (their latest attempts).

    Each line is prefixed with its task's name. On a terminal, control
    characters and escape sequences in the output are shown escaped
    (``\x1b``); to a pipe or a file each stream gets the task's own text.
    """
    offsets: dict[tuple[int, str], int] = {}
    raw = {"stdout": not sys.stdout.isatty(), "stderr": not sys.stderr.isatty()}
    with _client(master, master_timeout) as client:
        while True:
            job = _call(client.get_job, job_id, _job=job_id)
            for stage in job.stages:
                for task in stage.tasks:
                    if task_id is not None and task.id != task_id:
                        continue
                    if not task.attempts:
                        continue
                    attempt = task.attempts[-1]
                    for stream in ("stdout", "stderr"):
                        key = (attempt.id, stream)
                        chunk = _call(
                            client.read_log, attempt.id, stream, offsets.get(key, 0), _job=job_id
                        )
                        offsets[key] = chunk.next_offset
                        out = sys.stdout if stream == "stdout" else sys.stderr
                        label = printable(task.name or task.id)
                        for line in chunk.data.splitlines():
                            shown = line if raw[stream] else printable(line, keep_tabs=True)
                            print(f"[{label}] {shown}", file=out)
            if not follow or job.state in ("succeeded", "failed", "cancelled"):
                return
            time.sleep(0.5)


@app.command()
@click.argument("job_id", type=int)
@inspect_master_opt
@master_timeout_opt
def cancel(job_id: int, master: str | None, master_timeout: str | None) -> None:
    """Cancel a job: its queued tasks never start, running ones are stopped."""
    with _client(master, master_timeout) as client:
        job = _call(client.cancel_job, job_id, _job=job_id)
        console().print(f"job {job.id} {job.state}", highlight=False)


@app.command()
@inspect_master_opt
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@master_timeout_opt
def agents(master: str | None, as_json: bool, master_timeout: str | None) -> None:
    """List the agents registered with the farm and their resource usage."""
    with _client(master, master_timeout) as client:
        items = _call(client.list_agents)
        if as_json:
            print(json.dumps([a.model_dump(mode="json") for a in items], indent=2))
            return
        from herder.cli_acl import accepts_text

        table = _table(
            "id", "name", "host", "state", "slots", "running", "load", "ram", "last seen", "accepts"
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
                *(markup_safe(v) for v in (a.id, a.name, a.hostname, a.state)),
                str(a.slots),
                str(a.running),
                load,
                ram,
                seen,
                markup_safe(accepts_text(a)),
            )
        console().print(table)


@app.command()
@click.argument("agent_id")
@master_opt
@click.option("--undo", is_flag=True, help="Undrain: let the agent take new work again.")
@master_timeout_opt
def drain(agent_id: str, master: str, undo: bool, master_timeout: str | None) -> None:
    """Drain an agent: no new work; it exits once its running tasks are done and reported."""
    from herder.api_models import AgentView

    action = "undrain" if undo else "drain"
    with _client(master, master_timeout) as client:
        view = _call(
            client._call,  # no HerderClient method for it yet: the generic request loop
            AgentView,
            "POST",
            f"/agents/{agent_id}/{action}",
            idempotent=True,
        )
        console().print(printable(f"agent {view.id} {view.state}"), highlight=False, markup=False)


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
    help="Working directory (default: the current one); a relative RAKEFILE found there "
    "is read from there.",
)
@click.option("--plain", is_flag=True, help="Line output even on a terminal.")
@click.option(
    "--direct",
    is_flag=True,
    help="No master: send each remote action to the cheapest agent of HOSTS (DESIGN §9; "
    "agents started with --direct-listen; token from $HERDER_DIRECT_TOKEN).",
)
@click.option(
    "--hosts",
    default=None,
    help="Direct mode: agents as HOST:PORT,HOST:PORT (https://HOST:PORT: over TLS; default: "
    "the Rakefile's HOSTS and PORT).",
)
@master_timeout_opt
def run(
    rakefile: Path,
    master: str | None,
    slots: int,
    chdir: Path | None,
    plain: bool,
    direct: bool,
    hosts: str | None,
    master_timeout: str | None,
) -> None:
    """Build a Rakefile: actionsets in order, the actions of each in parallel.

    Exit status: 0 built, 1 an action failed, 2 a bad Rakefile or option,
    75 no master answered within --master-timeout (the job goes on in the farm).
    """
    from herder.build import Build, BuildError, PlainReporter, Reporter, RichReporter
    from herder.client.errors import ApiError, HerderClientError, NoMasterAvailable
    from herder.rakefile import RakefileError, load_rakefile

    if chdir is not None and not rakefile.is_absolute() and (chdir / rakefile).exists():
        rakefile = chdir / rakefile  # as `make -C DIR`: the Rakefile of that directory
    try:
        parsed = load_rakefile(rakefile)
    except RakefileError as exc:
        _bad_input(str(exc))
    workdir = (chdir or Path.cwd()).resolve()
    if not workdir.is_dir():
        _fail(f"working directory {workdir} does not exist", 2)
    # The first actionset's files exist now (later ones' may be made by earlier
    # actionsets: they are checked when their actionset starts, see _CheckedBuild).
    try:
        _check_requires(str(rakefile), parsed.actionsets[0].actions, workdir)
    except RakefileError as exc:
        _bad_input(str(exc))
    if hosts is not None and not direct:
        _fail("--hosts is for direct mode: add --direct", 2)
    if direct:
        if master:
            _fail("--direct and --master: choose one (direct mode needs no master)", 2)
        _run_direct(rakefile, parsed, workdir, plain, hosts)
    ok = False
    with _stop_on_signals():
        farm: Any = None
        client: Any = None
        try:
            if master:
                client = _http_client(_masters(master), master_timeout)
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
            build = _checked_build(Build, str(rakefile))(
                client, parsed, workdir, reporter, name=_job_name(rakefile)
            )
            try:
                ok = build.run()
            except RakefileError as exc:  # a required file of a later actionset
                _stop_reporter(reporter)
                _bad_input(str(exc))
            except BuildError as exc:
                _stop_reporter(reporter)
                _fail(f"{rakefile}: {exc}", 2)
            except (ApiError, NoMasterAvailable, HerderClientError) as exc:
                if farm is None and isinstance(exc, NoMasterAvailable):
                    _no_master(exc, build.job_id)  # the job goes on: never cancelled here
                where = f" (embedded farm log: {workdir / '.herder' / 'logs' / 'farm.log'})"
                _fail(f"farm error: {exc}{where if farm is not None else ''}")
        finally:
            if client is not None:
                client.close()
            if farm is not None:
                # Nothing runs any more (a failed build cancelled its job): stop now.
                farm.close(at_once=True)
    raise Exit(0 if ok else 1)


def main() -> None:
    app(prog_name="herder")


if __name__ == "__main__":
    main()
