"""``herder job``: control a submitted job (pause, resume, retry, change it).

Without --master, the commands act on the state ``herder run`` left in
./.herder (as ``herder cancel`` does), else on http://127.0.0.1:6240.
Exit status: 0 done, 1 the farm refused (e.g. 409: not allowed in the job's
state; 422: a bad value; 404: no such job), 75 no master answered.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import click

from herder.cli_farm import master_timeout_opt

if TYPE_CHECKING:
    from herder.api_models import JobSubmit, JobView

_master_opt = click.option(
    "--master",
    "-m",
    envvar="HERDER_MASTER",
    default=None,
    help="Master URL(s), comma-separated. Without it: the state `herder run` left in "
    "./.herder, else http://127.0.0.1:6240.",
)


def _run(master: str | None, master_timeout: str | None, job_id: int, op: str, **kw: Any) -> None:
    # herder.cli imports this module: its helpers are looked up at call time.
    from herder.cli import _call, _client, console

    with _client(master, master_timeout) as client:
        job = _call(getattr(client, op), job_id, _job=job_id, **kw)
        console().print(f"job {job.id} {job.state} (priority {job.priority})", highlight=False)


@click.group(name="job")
def job() -> None:
    """Control a submitted job: pause, resume, retry, set."""


@job.command()
@click.argument("job_id", type=int)
@click.option(
    "--kill",
    is_flag=True,
    help="Stop its running tasks now: they are queued again, no failure counted.",
)
@_master_opt
@master_timeout_opt
def pause(job_id: int, kill: bool, master: str | None, master_timeout: str | None) -> None:
    """Pause a job: nothing of it starts any more; running tasks finish (or, --kill, stop)."""
    _run(master, master_timeout, job_id, "pause_job", kill=kill)


@job.command()
@click.argument("job_id", type=int)
@_master_opt
@master_timeout_opt
def resume(job_id: int, master: str | None, master_timeout: str | None) -> None:
    """Resume a paused job."""
    _run(master, master_timeout, job_id, "resume_job")


@job.command()
@click.argument("job_id", type=int)
@_master_opt
@master_timeout_opt
def retry(job_id: int, master: str | None, master_timeout: str | None) -> None:
    """Retry a failed or cancelled job: its failed and cancelled tasks run again,
    with fresh attempt budgets."""
    _run(master, master_timeout, job_id, "retry_job")


def _tags(ctx: click.Context, param: click.Parameter, value: str | None) -> list[str] | None:
    if value is None:
        return None
    return [t.strip() for t in value.split(",") if t.strip()]


@job.command(name="set")
@click.argument("job_id", type=int)
@click.option("--priority", type=int, default=None, help="Higher runs first (-1000..1000).")
@click.option(
    "--tags",
    default=None,
    callback=_tags,
    help="Comma-separated tags an agent must offer ('' clears).",
)
@click.option("--cpus", type=int, default=None, help="CPUs each task needs.")
@click.option("--ram-mb", type=int, default=None, help="RAM each task needs, in MB.")
@click.option("--gpus", type=int, default=None, help="GPUs each task needs.")
@click.option("--max-attempts", type=int, default=None, help="Attempts each task gets (1..100).")
@_master_opt
@master_timeout_opt
def set_(
    job_id: int,
    priority: int | None,
    tags: list[str] | None,
    cpus: int | None,
    ram_mb: int | None,
    gpus: int | None,
    max_attempts: int | None,
    master: str | None,
    master_timeout: str | None,
) -> None:
    """Change a waiting, queued, running or paused job: priority, tags, cpus and ram of
    its tasks not started yet, max attempts of every task not finished."""
    from herder.cli_common import _fail

    fields = {
        "priority": priority,
        "tags": tags,
        "cpus": cpus,
        "ram_mb": ram_mb,
        "gpus": gpus,
        "max_attempts": max_attempts,
    }
    given = {k: v for k, v in fields.items() if v is not None}
    if not given:
        _fail(
            "nothing to change: give --priority, --tags, --cpus, --ram-mb, --gpus or --max-attempts",
            2,
        )
    _run(master, master_timeout, job_id, "update_job", **given)


def with_parents(
    spec: JobSubmit, depends_on: Sequence[int], on_parent_failure: str | None
) -> JobSubmit:
    """``herder submit --depends-on … --on-parent-failure …`` applied to a job file's spec."""
    update: dict[str, Any] = {}
    if depends_on:
        update["depends_on"] = list(dict.fromkeys([*spec.depends_on, *depends_on]))
    if on_parent_failure is not None:
        update["on_parent_failure"] = on_parent_failure
    return spec.model_copy(update=update) if update else spec


def relation_lines(job: JobView) -> list[str]:
    """``herder status JOB``: the jobs it waits for and the jobs waiting for it."""
    from herder.display import printable

    out: list[str] = []
    for what, links in (("depends on", job.depends_on), ("dependents", job.dependents)):
        if links:
            shown = ", ".join(f"{j.id} {j.name} ({j.state}) {j.href}" for j in links)
            out.append(printable(f"  {what}: {shown}"))
    if job.depends_on:
        out.append(f"  on parent failure: {job.on_parent_failure}")
    return out
