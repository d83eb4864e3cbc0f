"""`herder run`: drive a Rakefile build through a farm (DESIGN §3, §10, §12).

The client drives the actionsets in order, as the rake client of seeds/003
does: each actionset's remote actions are submitted as one job (its required
files exist by then, since earlier actionsets' outputs were written back, so
their digests are known; small ones ride inside the submission), its local
actions run here in the working directory, all in parallel; when every action
succeeded, the next actionset starts. The first failure stops the build.

Remote results arrive through the job's follow stream (one long-poll that
answers as soon as tasks finish, with their logs and small outputs inline):
no polling interval and no request per action. ``client`` is a
:class:`herder.client.HerderClient` (a farm over HTTP) or a
:class:`herder.inprocess.InProcessClient` (the embedded farm); both return
the same records.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import queue
import subprocess
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from herder.api_models import INLINE_REQUIRE_MAX, SUBMIT_INLINE_MAX, JobSubmit, StageSpec, TaskSpec
from herder.client.files import hash_files
from herder.paths import resolve_inside
from herder.rakefile import Action, Actionset, Rakefile
from herder.records import FINAL_TASK_STATES, FollowPage, TaskResult
from herder.reporting import PlainReporter, RichReporter

__all__ = ["Build", "BuildError", "PlainReporter", "Reporter", "RichReporter"]

FOLLOW_WAIT_S = 20.0
MAX_REWINDS = 3


class BuildError(Exception):
    """A build that cannot start or go on for a reason outside any action."""


@dataclass(slots=True)
class ActionRun:
    label: str
    action: Action
    state: str = "queued"  # queued, running, fetching, succeeded, failed, cancelled
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
    succeeded: int = 0  # counted as actions finish (a 100,000-action set is not rescanned)
    failed: int = 0

    @property
    def done(self) -> int:
        return self.succeeded


class Reporter(Protocol):
    def start_set(self, run: SetRun) -> None: ...
    def action_started(self, run: SetRun, action: ActionRun) -> None: ...
    def action_finished(self, run: SetRun, action: ActionRun) -> None: ...
    def refresh(self, sets: list[SetRun]) -> None: ...
    def finish(self, sets: list[SetRun], ok: bool, elapsed: float) -> None: ...


class BuildClient(Protocol):
    """What a build needs of a client (HTTP or in-process)."""

    def missing_blobs(self, digests: Any) -> list[str]: ...
    def put_blob(self, digest: str, data: bytes) -> Any: ...
    # inputs: {digest: file} the farm may lack, uploaded through the submission's
    # continuation (issue 10).
    def submit_job_ids(self, spec: JobSubmit, *, inputs: dict[str, Any] | None = ...) -> Any: ...
    def follow_job(
        self,
        job_id: int,
        after: int = 0,
        *,
        wait_s: float = ...,
        limit: int = ...,
        events: bool = ...,
    ) -> FollowPage: ...
    def cancel_job(self, job_id: int) -> Any: ...
    def read_full_log(self, attempt_id: int, stream: str = "stdout") -> str: ...
    def download_blob(self, digest: str, dest: Path | str, *, mode: int | None = None) -> int: ...


class LocalAction(threading.Thread):
    """A local action runs on this machine, in the working directory."""

    def __init__(self, run: ActionRun, workdir: Path, done: queue.SimpleQueue[Any]) -> None:
        super().__init__(daemon=True)
        self.run_ = run
        self.workdir = workdir
        self.done = done
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
        self.done.put(("local", self))

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, 9)


def _notify(inbox: queue.SimpleQueue[Any], a: ActionRun) -> Any:
    def done(fut: Future[None]) -> None:
        inbox.put(("fetched", (a, fut)))

    return done


def _exit_text(code: int) -> str:
    return f"killed by signal {-code}" if code < 0 else f"exit status {code}"


class _Follower(threading.Thread):
    """Follows one job's stream and puts each page on the build's queue."""

    def __init__(
        self, client: BuildClient, job_id: int, out: queue.SimpleQueue[Any], wait_s: float
    ) -> None:
        super().__init__(name=f"herder-follow-{job_id}", daemon=True)
        self.client = client
        self.job_id = job_id
        self.out = out
        self.wait_s = wait_s
        self.after = 0
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                page = self.client.follow_job(self.job_id, self.after, wait_s=self.wait_s)
                moved = page.next > self.after
                self.after = page.next
                self.out.put(("page", page))
                if page.state in FINAL_TASK_STATES and not moved:
                    return  # over, and nothing more to read
        except BaseException as exc:
            self.out.put(("error", exc))


def follower_after(follower: _Follower | None) -> int:
    return -1 if follower is None else follower.after


class Build:
    def __init__(
        self,
        client: BuildClient,
        rakefile: Rakefile,
        workdir: Path,
        reporter: Reporter,
        *,
        name: str = "build",
        follow_wait_s: float = FOLLOW_WAIT_S,
        fetchers: int = 8,
    ) -> None:
        self.client = client
        self.rakefile = rakefile
        self.workdir = workdir
        self.reporter = reporter
        self.name = name
        self.follow_wait_s = follow_wait_s
        self.fetchers = fetchers
        self.build_id = uuid.uuid4().hex[:12]
        self.sets: list[SetRun] = []

    @property
    def job_id(self) -> int | None:
        """The job of the actionset running now (or last), once submitted."""
        return self.sets[-1].job_id if self.sets else None

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

    # ---------------------------------------------------------------- submit

    def _hash_requires(
        self, remote: list[ActionRun]
    ) -> tuple[dict[str, tuple[str, int, int]], dict[str, Path]]:
        """Every required file of the remote actions exists: hash them (``hash_files``).

        One pass over the files; only when one cannot be hashed are they checked
        again, to name the first missing one and its action.
        """
        try:
            return hash_files(self.workdir, sorted({p for a in remote for p in a.action.requires}))
        except OSError:
            for a in remote:
                for p in a.action.requires:
                    if not resolve_inside(self.workdir, p).is_file():
                        raise BuildError(
                            f"line {a.action.line}: required file {p!r} of {a.label} "
                            f"does not exist in {self.workdir}"
                        ) from None
            raise

    def _submit(self, index: int, run: SetRun) -> int | None:
        remote = [a for a in run.actions if a.action.remote]
        if not remote:
            return None
        hashed, where = self._hash_requires(remote)
        blobs = self._ship(where)
        # The rest go through the submission's continuation: the master holds the job
        # until those it lacks are uploaded (issue 10), so a file it collected since
        # the look-up is asked for again rather than missed.
        inputs: dict[str, Any] = {d: p for d, p in where.items() if d not in blobs}
        tasks = [
            TaskSpec(
                name=a.label,
                command=a.action.command,
                requires=[
                    {"path": p, "digest": hashed[p][0], "mode": hashed[p][2]}  # type: ignore[misc]
                    for p in a.action.requires
                ],
            )
            for a in remote
        ]
        spec = JobSubmit(
            name=f"{self.name}: {run.actionset.name}",
            idempotency_key=f"run-{self.build_id}-{index}",
            stages=[StageSpec(name=run.actionset.name, tasks=tasks)],
            blobs=blobs,
        )
        # (No inputs left: everything is inline, and the submission stores it.)
        sub = (
            self.client.submit_job_ids(spec, inputs=inputs)
            if inputs
            else self.client.submit_job_ids(spec)
        )
        run.job_id = sub.id
        for a, tid in zip(remote, sub.task_ids, strict=True):
            a.task_id = tid
        return int(sub.id)

    def _ship(self, where: dict[str, Path]) -> dict[str, str]:
        """Files the farm lacks that are small: inline in the submission (the big ones
        are uploaded through its continuation)."""
        if not where:
            return {}
        inline: dict[str, str] = {}
        total = 0
        for digest in self.client.missing_blobs(list(where)):
            size = where[digest].stat().st_size
            if size > INLINE_REQUIRE_MAX or total + size > SUBMIT_INLINE_MAX:
                continue
            data = where[digest].read_bytes()
            if hashlib.sha256(data).hexdigest() != digest:
                raise BuildError(f"{where[digest]} changed while it was being sent")
            if len(data) <= INLINE_REQUIRE_MAX and total + len(data) <= SUBMIT_INLINE_MAX:
                inline[digest] = base64.b64encode(data).decode("ascii")
                total += len(data)
        return inline

    # ------------------------------------------------------------------ run

    def _run_set(self, index: int, run: SetRun) -> bool:
        job_id = self._submit(index, run)
        inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        locals_ = [LocalAction(a, self.workdir, inbox) for a in run.actions if not a.action.remote]
        for t in locals_:
            t.start()
            self.reporter.action_started(run, t.run_)
        remote = {a.task_id: a for a in run.actions if a.action.remote}
        pending = len(run.actions)
        follower = None
        if job_id is not None:
            follower = _Follower(self.client, job_id, inbox, self.follow_wait_s)
            follower.start()
        fetching: set[Future[None]] = set()
        failed = False
        refreshed = 0.0
        rewinds = 0
        with ThreadPoolExecutor(max_workers=self.fetchers, thread_name_prefix="fetch") as pool:
            try:
                while pending and not failed:
                    kind, item = inbox.get()
                    if kind == "error":
                        raise item
                    if kind == "local":
                        pending -= 1
                        failed |= not self._finished(run, item.run_)
                    elif kind == "fetched":
                        a, fut = item
                        fetching.discard(fut)
                        fut.result()
                        pending -= 1
                        failed |= not self._finished(run, a)
                    elif kind == "page":
                        page: FollowPage = item
                        for tid in page.started:
                            a = remote.get(tid)
                            if a is not None and a.state == "queued":
                                a.state, a.started = "running", time.monotonic()
                                self.reporter.action_started(run, a)
                        for res in page.results:
                            a = remote.get(res.task_id)
                            if a is None or a.state not in ("queued", "running"):
                                continue
                            if self._collect(a, res):
                                pending -= 1
                                failed |= not self._finished(run, a)
                            else:
                                a.state = "fetching"
                                fut = pool.submit(self._fetch, a, res)
                                fetching.add(fut)
                                fut.add_done_callback(_notify(inbox, a))
                        if page.state in FINAL_TASK_STATES and job_id is not None:
                            waiting = [
                                a for a in remote.values() if a.state in ("queued", "running")
                            ]
                            if waiting and not failed and page.next == follower_after(follower):
                                # The job is over but some results never came: an event
                                # committed out of id order (PostgreSQL) was skipped.
                                # Read the stream again from the start, a few times at most.
                                rewinds += 1
                                if rewinds > MAX_REWINDS:
                                    raise BuildError(
                                        f"job {job_id} is {page.state} but never reported "
                                        f"{waiting[0].label} (and {len(waiting) - 1} more)"
                                    )
                                if follower is not None:
                                    follower.stop.set()
                                follower = _Follower(self.client, job_id, inbox, self.follow_wait_s)
                                follower.start()
                    now = time.monotonic()
                    # Refresh before blocking (nothing more queued), else at most every 0.1 s.
                    if inbox.empty() or now - refreshed >= 0.1:
                        refreshed = now
                        self.reporter.refresh(self.sets)
            finally:
                if follower is not None:
                    follower.stop.set()
            if failed:
                self._stop_set(run, job_id, locals_, fetching)
                return False
        return True

    def _finished(self, run: SetRun, a: ActionRun) -> bool:
        ok = a.state == "succeeded"
        if ok:
            run.succeeded += 1
        else:
            run.failed += 1
        self.reporter.action_finished(run, a)
        return ok

    def _stop_set(
        self,
        run: SetRun,
        job_id: int | None,
        locals_: list[LocalAction],
        fetching: set[Future[None]],
    ) -> None:
        """No later actionset starts; stop what still runs of this one."""
        if job_id is not None:
            try:
                self.client.cancel_job(job_id)
            except Exception:  # the failure report matters more than the cancel
                pass
        for t in locals_:
            if t.is_alive():
                t.kill()
                t.join(5)
        for fut in list(fetching):
            with contextlib.suppress(Exception):
                fut.result()
        for a in run.actions:
            if a.state in ("queued", "running", "fetching"):
                a.state = "cancelled"

    # -------------------------------------------------------------- results

    def _collect(self, a: ActionRun, res: TaskResult) -> bool:
        """Take what the follow stream carried; True when nothing is left to fetch."""
        a.finished = time.monotonic()
        if a.started is None:
            a.started = a.finished
        a.exit_code = res.exit_code
        a.error = res.error
        if res.state == "rejected":
            # Never ran (its pool's ACL forbids the job's owner): no logs to fetch,
            # the reason is its error. A failed action to the build and its report.
            a.error, a.state = f"rejected: {res.error or 'by its pool ACL'}", "failed"
            return True
        if res.stdout is None or res.stderr is None:
            return False
        if res.state == "succeeded" and any(o.digest not in res.blobs for o in res.outputs):
            return False
        a.stdout, a.stderr = res.stdout, res.stderr
        if res.state == "succeeded":
            for o in res.outputs:
                self._write(o.path, res.blobs[o.digest], o.mode)
        a.state = res.state
        return True

    def _fetch(self, a: ActionRun, res: TaskResult) -> None:
        if res.attempt_id is not None:
            a.stdout = (
                res.stdout
                if res.stdout is not None
                else self.client.read_full_log(res.attempt_id, "stdout")
            )
            a.stderr = (
                res.stderr
                if res.stderr is not None
                else self.client.read_full_log(res.attempt_id, "stderr")
            )
        if res.state == "succeeded":
            for o in res.outputs:
                data = res.blobs.get(o.digest)
                if data is not None:
                    self._write(o.path, data, o.mode)
                else:
                    dest = resolve_inside(self.workdir, o.path)
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    self.client.download_blob(o.digest, dest, mode=o.mode)
        # Set last: the action counts as finished only once its files are here.
        a.state = res.state

    def _write(self, relpath: str, data: bytes, mode: int) -> None:
        dest = resolve_inside(self.workdir, relpath)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.parent / f".{dest.name}.{uuid.uuid4().hex[:8]}.part"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.chmod(tmp, mode)
            os.replace(tmp, dest)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
