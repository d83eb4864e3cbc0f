"""`herder run`: drive a Rakefile build through a farm (DESIGN §3, §12).

The client drives the actionsets in order, as the rake client of seeds/003
does: each actionset's remote actions are submitted as one job (its required
files exist by then, since earlier actionsets' outputs were written back, so
their digests are known), its local actions run here in the working
directory, all in parallel; when every action succeeded, the next actionset
starts. The first failure stops the build.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TextIO

from herder.api_models import JobSubmit, JobView, StageSpec, TaskSpec
from herder.client import HerderClient
from herder.paths import resolve_inside
from herder.rakefile import Action, Actionset, Rakefile


class BuildError(Exception):
    """A build that cannot start or go on for a reason outside any action."""


@dataclass
class ActionRun:
    label: str
    action: Action
    state: str = "queued"  # queued, running, succeeded, failed, cancelled
    started: float | None = None
    finished: float | None = None
    exit_code: int | None = None
    error: str | None = None
    stdout: str = ""
    stderr: str = ""
    task_id: int | None = None

    @property
    def elapsed(self) -> float:
        if self.started is None:
            return 0.0
        return (self.finished or time.monotonic()) - self.started


@dataclass
class SetRun:
    actionset: Actionset
    actions: list[ActionRun] = field(default_factory=list)
    job_id: int | None = None

    @property
    def done(self) -> int:
        return sum(1 for a in self.actions if a.state == "succeeded")


class Reporter(Protocol):
    def start_set(self, run: SetRun) -> None: ...
    def action_started(self, run: SetRun, action: ActionRun) -> None: ...
    def action_finished(self, run: SetRun, action: ActionRun) -> None: ...
    def refresh(self, sets: list[SetRun]) -> None: ...
    def finish(self, sets: list[SetRun], ok: bool, elapsed: float) -> None: ...


class LocalAction(threading.Thread):
    """A local action runs on this machine, in the working directory."""

    def __init__(self, run: ActionRun, workdir: Path) -> None:
        super().__init__(daemon=True)
        self.run_ = run
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    def run(self) -> None:
        r = self.run_
        r.state = "running"
        r.started = time.monotonic()
        try:
            self.proc = subprocess.Popen(
                ["/bin/sh", "-c", r.action.command],
                cwd=self.workdir,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
            out, err = self.proc.communicate()
            r.stdout = out.decode(errors="replace")
            r.stderr = err.decode(errors="replace")
            r.exit_code = self.proc.returncode
            r.state = "succeeded" if r.exit_code == 0 else "failed"
            if r.exit_code != 0:
                r.error = _exit_text(r.exit_code)
        except OSError as exc:
            r.state, r.error, r.exit_code = "failed", f"could not start: {exc}", 127
        r.finished = time.monotonic()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, 9)
            except ProcessLookupError:
                pass


def _exit_text(code: int) -> str:
    return f"killed by signal {-code}" if code < 0 else f"exit status {code}"


class Build:
    def __init__(
        self,
        client: HerderClient,
        rakefile: Rakefile,
        workdir: Path,
        reporter: Reporter,
        *,
        name: str = "build",
        poll_s: float = 0.05,
    ) -> None:
        self.client = client
        self.rakefile = rakefile
        self.workdir = workdir
        self.reporter = reporter
        self.name = name
        self.poll_s = poll_s
        self.build_id = uuid.uuid4().hex[:12]
        self.sets: list[SetRun] = []

    def run(self) -> bool:
        started = time.monotonic()
        ok = True
        for index, aset in enumerate(self.rakefile.actionsets):
            run = SetRun(aset)
            for i, action in enumerate(aset.actions):
                run.actions.append(ActionRun(f"{aset.name}[{i}]", action))
            self.sets.append(run)
            self.reporter.start_set(run)
            if not self._run_set(index, run):
                ok = False
                break
        self.reporter.finish(self.sets, ok, time.monotonic() - started)
        return ok

    # ------------------------------------------------------------------

    def _submit(self, index: int, run: SetRun) -> JobView | None:
        remote = [a for a in run.actions if a.action.remote]
        if not remote:
            return None
        paths = sorted({p for a in remote for p in a.action.requires})
        for a in remote:
            for p in a.action.requires:
                if not resolve_inside(self.workdir, p).is_file():
                    raise BuildError(
                        f"line {a.action.line}: required file {p!r} of {a.label} does not exist in {self.workdir}"
                    )
        uploaded = self.client.upload_files(self.workdir, paths)
        tasks = []
        for a in remote:
            tasks.append(
                TaskSpec(
                    name=a.label,
                    command=a.action.command,
                    requires=[
                        {"path": p, "digest": uploaded[p][0], "mode": uploaded[p][2]}  # type: ignore[misc]
                        for p in a.action.requires
                    ],
                )
            )
        spec = JobSubmit(
            name=f"{self.name}: {run.actionset.name}",
            idempotency_key=f"run-{self.build_id}-{index}",
            stages=[StageSpec(name=run.actionset.name, tasks=tasks)],
        )
        job = self.client.submit_job(spec)
        run.job_id = job.id
        by_label = {t.name: t for t in job.stages[0].tasks}
        for a in remote:
            a.task_id = by_label[a.label].id
        return job

    def _run_set(self, index: int, run: SetRun) -> bool:
        job = self._submit(index, run)
        locals_ = [LocalAction(a, self.workdir) for a in run.actions if not a.action.remote]
        for t in locals_:
            t.start()
            self.reporter.action_started(run, t.run_)
        remote = {a.task_id: a for a in run.actions if a.action.remote}
        pending_local = set(locals_)
        fetching: dict[Future[None], ActionRun] = {}
        after = 0
        failed = False
        # Outputs and logs of finished tasks are fetched in parallel, so one
        # slow download does not hold up noticing the next task's end.
        with ThreadPoolExecutor(max_workers=8, thread_name_prefix="fetch") as pool:
            while True:
                for t in list(pending_local):
                    if not t.is_alive():
                        pending_local.discard(t)
                        self.reporter.action_finished(run, t.run_)
                        failed |= t.run_.state != "succeeded"
                if job is not None:
                    # Follow the job through its event log: each poll costs
                    # only what changed, not the whole job's view.
                    while True:
                        events = self.client.job_events(job.id, after=after)
                        for ev in events:
                            after = ev.id
                            a = remote.get(ev.task_id)
                            if a is None or a.state not in ("queued", "running"):
                                continue
                            if ev.to_state in ("offered", "running") and a.state == "queued":
                                a.state, a.started = "running", time.monotonic()
                                self.reporter.action_started(run, a)
                            elif ev.to_state in _TERMINAL:
                                a.state = "fetching"
                                fetching[pool.submit(self._fetch_remote, a)] = a
                        if len(events) < 1000:
                            break
                for fut in [f for f in fetching if f.done()]:
                    a = fetching.pop(fut)
                    fut.result()
                    self.reporter.action_finished(run, a)
                    failed |= a.state != "succeeded"
                remote_done = all(a.state in _TERMINAL for a in remote.values())
                if failed or (not pending_local and remote_done):
                    break
                self.reporter.refresh(self.sets)
                time.sleep(self.poll_s)
            if failed:
                # No later actionset starts; stop what still runs of this one.
                if job is not None:
                    try:
                        self.client.cancel_job(job.id)
                    except Exception:  # the failure report matters more than the cancel
                        pass
                for t in pending_local:
                    t.kill()
                    t.join(5)
                for fut in list(fetching):
                    a = fetching.pop(fut)
                    fut.result()
                    self.reporter.action_finished(run, a)
                for a in run.actions:
                    if a.state in ("queued", "running"):
                        a.state = "cancelled"
                return False
        return True

    def _fetch_remote(self, a: ActionRun) -> None:
        assert a.task_id is not None
        task = self.client.get_task(a.task_id)
        a.finished = time.monotonic()
        if a.started is None:
            a.started = a.finished
        a.exit_code = task.exit_code
        a.error = task.error
        if task.attempts:
            attempt = task.attempts[-1]
            # The task is final, so its logs are: an empty one needs no request.
            if attempt.stdout_len:
                a.stdout = self.client.read_full_log(attempt.id, "stdout")
            if attempt.stderr_len:
                a.stderr = self.client.read_full_log(attempt.id, "stderr")
            if task.state == "succeeded":
                for out in attempt.outputs:
                    dest = resolve_inside(self.workdir, out.path)
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    self.client.download_blob(out.digest, dest)
                    os.chmod(dest, out.mode)
        # Set last: the action counts as finished only once its files are here.
        a.state = task.state


_TERMINAL = ("succeeded", "failed", "cancelled")


# ---------------------------------------------------------------- reporting


class PlainReporter:
    """Line output for logs and pipes: one line per event."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.out: TextIO = stream or sys.stdout

    def _p(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def start_set(self, run: SetRun) -> None:
        self._p(f"== {run.actionset.name}: {len(run.actions)} action(s)")

    def action_started(self, run: SetRun, action: ActionRun) -> None:
        pass

    def action_finished(self, run: SetRun, a: ActionRun) -> None:
        where = "remote" if a.action.remote else "local"
        for stream, text in (("stdout", a.stdout), ("stderr", a.stderr)):
            for line in text.splitlines():
                self._p(f"[{a.label} {stream}] {line}")
        status = "ok" if a.state == "succeeded" else f"FAILED ({a.error or a.state})"
        self._p(
            f"-- {a.label} ({where}) `{a.action.command}` {status} in {a.elapsed:.2f}s "
            f"[{run.done}/{len(run.actions)}]"
        )

    def refresh(self, sets: list[SetRun]) -> None:
        pass

    def finish(self, sets: list[SetRun], ok: bool, elapsed: float) -> None:
        total = sum(len(s.actions) for s in sets)
        done = sum(s.done for s in sets)
        if ok:
            self._p(
                f"build succeeded: {done} action(s) in {len(sets)} actionset(s), {elapsed:.2f}s"
            )
            return
        for s in sets:
            for a in s.actions:
                if a.state == "failed":
                    self._p(
                        f"build FAILED: action {a.label} `{a.action.command}` (line {a.action.line}): "
                        f"{a.error or 'failed'}"
                    )
                    if a.stderr.strip():
                        self._p(f"stderr of {a.label}:")
                        for line in a.stderr.rstrip().splitlines():
                            self._p(f"  {line}")
        self._p(f"build FAILED after {elapsed:.2f}s ({done}/{total} actions succeeded)")


class RichReporter(PlainReporter):
    """Live progress on a terminal: per actionset done/total, running actions, failures."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.live import Live

        self.console = Console()
        super().__init__(None)
        self.live = Live(console=self.console, refresh_per_second=8, transient=True)
        self.live.start()
        self._sets: list[SetRun] = []

    def _p(self, text: str) -> None:
        self.console.print(text, highlight=False, markup=False)

    def start_set(self, run: SetRun) -> None:
        self._sets.append(run)
        super().start_set(run)
        self.refresh(self._sets)

    def refresh(self, sets: list[SetRun]) -> None:
        from rich.table import Table

        table = Table.grid(padding=(0, 2))
        for s in sets:
            failed = sum(1 for a in s.actions if a.state == "failed")
            table.add_row(
                f"[bold]{s.actionset.name}[/bold]",
                f"{s.done}/{len(s.actions)} done"
                + (f", [red]{failed} failed[/red]" if failed else ""),
            )
            for a in s.actions:
                if a.state == "running":
                    table.add_row(f"  {a.label}", f"{a.elapsed:5.1f}s  {a.action.command}")
        self.live.update(table)

    def finish(self, sets: list[SetRun], ok: bool, elapsed: float) -> None:
        self.live.stop()
        super().finish(sets, ok, elapsed)


def embedded_farm(slots: int, state_dir: Path) -> tuple[object, str]:
    """Start a master on SQLite and one local agent; return (farm, url).

    The database lives in ``state_dir`` (``.herder/`` of the working
    directory) and outlives the run, so ``herder status`` and ``herder logs``
    there can inspect the build afterwards.
    """
    from herder.localfarm import LocalFarm

    state_dir.mkdir(parents=True, exist_ok=True)
    # The master's and agent's logs of the last run stay next to the database,
    # so "see the master's log" after a farm error points at a file that exists.
    logs = state_dir / "logs"
    shutil.rmtree(logs, ignore_errors=True)
    farm = LocalFarm(
        db_url=f"sqlite:///{state_dir / 'herder.db'}", workdir=logs, lease_s=30, ack_timeout_s=30
    )
    farm.start_master()
    farm.start_agent(slots=slots, name="local", state_dir=state_dir / "agent")
    farm.wait_agents(1)
    return farm, farm.url
