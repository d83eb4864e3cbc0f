"""Run one attempt of a task in a fresh sandbox (no network here).

Layout of one sandbox::

    <work_root>/a<attempt_id>/
        work/      the command's cwd and job root; requires are staged here
        stdout     the command's standard output
        stderr     the command's standard error

Inputs come from a local content-addressed cache
(``<blob_dir>/<digest[:2]>/<digest>``) and are hard-linked into ``work/``
when possible (else reflinked or copied in the kernel: ``clone_file``).
A delivered sandbox whose ``work/`` stayed empty is recycled (renamed to
``.spare-N``, logs truncated on reuse) instead of removed and made anew. A ``fetch_blob(digest, dest)`` callback
fills the cache on a miss; the daemon passes the client's ``download_blob``.

The command runs in its own session, so timeouts and cancellation kill the
whole process group, background children included. How it is started lives
in ``herder.agent.launch``; the watch of running attempts (RSS against
``ram_mb``, the kernel's OOM kill, progress, stuck tasks) in
``herder.agent.watch``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import stat
import subprocess
import threading
import time
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from herder.agent import procs
from herder.agent.execspec import ExecResult, ExecSpec
from herder.agent.files import (
    BlobCache,
    FetchBlob,
    LogTail,
    SandboxCleaner,
    StagingError,
    append_log,
    clone_file,
    rmtree_sandbox,
)
from herder.agent.launch import (
    CommandNotRunnable,
    ProgramCache,
    child_env,
    direct_argv,
    shell_code,
    signame,
    spawn,
)
from herder.agent.outputs import Snapshot, collect, snapshot
from herder.agent.sandboxes import SANDBOX_PREFIX, SPARE_PREFIX, SandboxPool
from herder.agent.watch import DEFAULT_RAM_TOLERANCE, DEFAULT_WATCH_INTERVAL_S, Watcher, WatchState
from herder.api_models import LogChunk, Outcome, RequiredFile
from herder.paths import UnsafePath, resolve_inside

if TYPE_CHECKING:
    pass

log = logging.getLogger("herder.agent")

Stream = Literal["stdout", "stderr"]
STREAMS: tuple[Stream, Stream] = ("stdout", "stderr")

# ------------------------------------------------------------------ execution


class Execution:
    """One attempt in one sandbox. ``run()`` = ``prepare()`` + ``start()`` + ``wait()``.

    ``cancel()`` and ``read_logs()`` may be called from other threads.
    """

    def __init__(self, executor: Executor, spec: ExecSpec) -> None:
        self.executor = executor
        self.spec = spec
        # Paths as strings on the hot path; Path objects only when asked for.
        self._name = f"{SANDBOX_PREFIX}{spec.attempt_id}"
        self._sandbox_s = os.path.join(executor._work_root_s, self._name)
        self._work_s = os.path.join(self._sandbox_s, "work")
        self.proc: subprocess.Popen[bytes] | None = None
        self.pgid: int | None = None
        self.result: ExecResult | None = None
        self._tails = {s: LogTail(os.path.join(self._sandbox_s, s)) for s in STREAMS}
        self._log_fds: dict[Stream, int] = {}  # opened by prepare(), handed to the child
        self.log_lock = threading.Lock()  # one reader of the log tails at a time
        self._lock = threading.RLock()
        self._cancel: tuple[Outcome, str] | None = None
        self._kill_timer: threading.Timer | None = None
        self._snapshot: Snapshot = {}
        self._linked: dict[str, Path] = {}  # staged by hard link: relpath -> cache path
        self._t0 = 0.0
        self._spawned_at = 0.0
        self.work_empty: bool | None = None  # known after the outputs were collected
        self.watch: WatchState | None = None  # herder.agent.watch, while it runs

    # -- public -------------------------------------------------------------

    @functools.cached_property
    def sandbox(self) -> Path:
        return Path(self._sandbox_s)

    @functools.cached_property
    def work_dir(self) -> Path:
        return Path(self._work_s)

    @functools.cached_property
    def log_paths(self) -> dict[Stream, Path]:
        return {s: Path(self._sandbox_s, s) for s in STREAMS}

    def log_path_s(self, stream: Stream) -> str:
        return os.path.join(self._sandbox_s, stream)

    @property
    def progress(self) -> float | None:
        """The latest progress its output reported (a ``progress_pattern``), or None."""
        return self.watch.progress if self.watch is not None else None

    @property
    def attempt_id(self) -> int:
        return self.spec.attempt_id

    @property
    def running(self) -> bool:
        return self.proc is not None and self.result is None

    def run(self) -> ExecResult:
        self._t0 = time.monotonic()
        try:
            self.prepare()
        except StagingError as exc:
            return self._finish(ExecResult("launch_failed", error=str(exc)))
        early = self.start()
        if early is not None:
            return early
        return self.wait()

    def prepare(self) -> None:
        """Create the sandbox, stage the inputs, snapshot ``work/``, open the log files.

        The hot path (no inputs) is three ``mkdir``/``open`` system calls.
        """
        if not self._t0:
            self._t0 = time.monotonic()
        sandbox = self._sandbox_s
        if self._prepare_spare(sandbox):
            return
        try:
            try:
                os.mkdir(sandbox, 0o755)
            except FileExistsError:
                rmtree_sandbox(self.sandbox)
                os.makedirs(sandbox, 0o755)
            except FileNotFoundError:
                os.makedirs(sandbox, 0o755)
            os.mkdir(os.path.join(sandbox, "work"), 0o755)
            for req in self.spec.requires:
                self._stage(req)
            self._snapshot = snapshot(self.work_dir) if self.spec.requires else {}
            flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
            for s in STREAMS:
                self._log_fds[s] = os.open(os.path.join(sandbox, s), flags, 0o644)
        except StagingError:
            self._close_log_fds()
            raise
        except UnsafePath as exc:
            self._close_log_fds()
            raise StagingError(f"unsafe required path: {exc}") from exc
        except OSError as exc:
            self._close_log_fds()
            raise StagingError(f"cannot prepare sandbox {self.sandbox}: {exc}") from exc

    def _prepare_spare(self, sandbox: str) -> bool:
        """Take a recycled sandbox (empty ``work/``, log files) when one is spare.

        Renaming it and truncating its logs costs a fraction of creating and
        removing a sandbox (DESIGN §10). Only attempts without inputs use one;
        on any surprise it is removed and the caller makes a fresh sandbox.
        """
        if self.spec.requires:
            return False
        spare = self.executor._take_spare()
        if spare is None:
            return False
        # O_NONBLOCK and the fstat: a process that outlived its command may have
        # swapped a log for a FIFO (an open that never returns) or a device.
        flags = os.O_WRONLY | os.O_APPEND | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW
        try:
            os.rename(spare, sandbox)  # fails if the attempt's sandbox exists: fresh path
            for s in STREAMS:
                fd = self._log_fds[s] = os.open(os.path.join(sandbox, s), flags | os.O_NONBLOCK)
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    raise OSError(f"spare log {s} is not a regular file")
                os.set_blocking(fd, True)
        except OSError:
            self._close_log_fds()
            with contextlib.suppress(OSError):
                if os.path.lexists(spare):
                    rmtree_sandbox(Path(spare))
                else:
                    rmtree_sandbox(self.sandbox)
            return False
        self._snapshot = {}
        return True

    def _close_log_fds(self) -> None:
        fds, self._log_fds = self._log_fds, {}
        for fd in fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)

    def start(self) -> ExecResult | None:
        """Spawn the command. Returns a result right away when it cannot run."""
        with self._lock:
            if self._cancel is not None:
                self._close_log_fds()
                outcome, reason = self._cancel
                return self._finish(ExecResult(outcome, error=reason))
            self.executor._spawning(+1)
            try:
                self.proc = self._spawn()
                self.pgid = self.proc.pid
                self._spawned_at = time.monotonic()
                self.executor._register(self)
            except CommandNotRunnable as exc:
                self._append_stderr(f"herder: {exc.msg}\n")
                return self._finish(ExecResult("exited", exit_code=exc.code))
            except OSError as exc:
                return self._finish(
                    ExecResult("launch_failed", error=f"cannot start command: {exc}")
                )
            finally:
                self.executor._spawning(-1)
                self._close_log_fds()  # the child has its copies
        return None

    def wait(self) -> ExecResult:
        """Wait for the command (enforcing the timeout), reap its group, collect outputs."""
        proc = self.proc
        assert proc is not None, "start() first"
        assert self.pgid is not None
        timeout = self.spec.timeout_s
        timer: threading.Timer | None = None
        if timeout is not None:
            # Blocking wait plus a timer: no polling latency on the hot path.
            remaining = max(timeout - (time.monotonic() - self._spawned_at), 0.0)
            timer = threading.Timer(
                remaining, self.cancel, ("timeout", f"timed out after {timeout:g}s")
            )
            timer.daemon = True
            timer.start()
        try:
            proc.wait()
        finally:
            if timer is not None:
                timer.cancel()
            with self._lock:
                if self._kill_timer is not None:
                    self._kill_timer.cancel()
            procs.kill_group_and_wait(self.pgid)
            self.executor._unregister(self)

        rc = proc.returncode
        with self._lock:
            cancel = self._cancel
        oom = self.executor.watcher.finish(self, rc, cancel is not None)
        if cancel is not None:
            res = ExecResult(cancel[0], exit_code=shell_code(rc), error=cancel[1])
        elif oom is not None:
            res = ExecResult("memory", exit_code=shell_code(rc), error=oom)
        else:
            error = None if rc >= 0 else f"killed by {signame(-rc)}"
            res = ExecResult("exited", exit_code=shell_code(rc), error=error)
        if self.watch is not None:
            res.peak_rss_mb, res.progress = self.watch.peak_mb, self.watch.progress
        if res.outcome in ("exited", "timeout"):
            self._collect(res)
        return self._finish(res)

    def cancel(
        self, outcome: Outcome = "cancelled", reason: str = "cancelled", *, kill_now: bool = False
    ) -> None:
        """Kill the process group (SIGTERM, then SIGKILL after the grace period).

        ``kill_now``: SIGKILL at once (a group past its RAM must not grow on).
        """
        with self._lock:
            if self.result is not None or self._cancel is not None:
                return
            self._cancel = (outcome, reason)
            if self.pgid is None:
                return  # not started: start() will not spawn
            if kill_now:
                procs.signal_group(self.pgid, signal.SIGKILL)
                return
            self._terminate_group()
            pgid = self.pgid
            timer = threading.Timer(
                self.executor.kill_grace_s, procs.signal_group, (pgid, signal.SIGKILL)
            )
            timer.daemon = True
            self._kill_timer = timer
            timer.start()

    @property
    def cancelled(self) -> bool:
        return self._cancel is not None

    def read_logs(self, limit: int = 1 << 20, final: bool = False) -> tuple[list[LogChunk], bool]:
        """New log text since the last call, per stream (at most ``limit`` bytes each).

        Returns (chunks, more): ``more`` says a stream has more bytes waiting.
        Callers that ship the text hold ``log_lock`` across read and send.
        """
        chunks: list[LogChunk] = []
        more = False
        for s in STREAMS:
            text, m = self._tails[s].read(limit, final=final)
            more = more or m
            if text:
                chunks.append(LogChunk(stream=s, data=text))
        return chunks, more

    def cleanup(self, background: bool = False) -> None:
        """Remove the sandbox (after the completion was delivered).

        ``background``: hand it to the executor's cleaner thread, off the
        critical path of the next task.
        """
        self._close_log_fds()
        if background:
            if not self.executor._recycle(self):
                self.executor.cleaner.put(self.sandbox)
        else:
            rmtree_sandbox(self.sandbox)

    # -- internals ----------------------------------------------------------

    def _stage(self, req: RequiredFile) -> None:
        # No command has run in this new sandbox yet: its real path is known.
        real = os.path.join(self.executor.work_root_real, self._name, "work")
        dest = resolve_inside(self._work_s, req.path, root_real=real)
        if str(dest.parent) != real:  # re-checked after mkdir, which follows nothing unsafe
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest = resolve_inside(self._work_s, req.path, root_real=real)
        src = self.executor.blobs.ensure(req.digest)
        if os.path.lexists(dest):
            dest.unlink()
        mode = req.mode
        linked = False
        if mode is None or stat.S_IMODE(mode) == stat.S_IMODE(os.stat(src).st_mode):
            try:
                os.link(src, dest)
                linked = True
            except OSError:
                pass
        if not linked:
            clone_file(src, dest)
            os.chmod(dest, 0o644 if mode is None else mode)
        else:
            self._linked[req.path] = src

    def _spawn(self) -> subprocess.Popen[bytes]:
        if len(self._log_fds) != len(STREAMS):  # start() without prepare()
            flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
            for st in STREAMS:
                if st not in self._log_fds:
                    self._log_fds[st] = os.open(self.log_paths[st], flags, 0o644)
        spec, executor = self.spec, self.executor
        env = child_env(
            executor._base_env_b,
            spec.env,
            spec.attempt_id,
            spec.task_id,
            spec.job_id,
            self._work_s,
        )
        return spawn(
            spec.command,
            env=env,
            cwd=self._work_s,
            stdin=executor.devnull,
            stdout=self._log_fds["stdout"],
            stderr=self._log_fds["stderr"],
            shell=executor.shell,
            path=spec.env.get("PATH", executor.base_env.get("PATH")),
            programs=executor.programs,
        )

    def _append_stderr(self, text: str) -> None:
        append_log(self.log_path_s("stderr"), text.encode())  # never through a symlink

    def _terminate_group(self) -> None:
        if self.pgid is not None:
            procs.signal_group(self.pgid, signal.SIGTERM)

    def _collect(self, res: ExecResult) -> None:
        if not self._snapshot:
            # No inputs: an empty work dir after the command means no outputs
            # (one getdents instead of a walk), and the sandbox can be recycled.
            try:
                self.work_empty = not os.listdir(self._work_s)
            except OSError:
                self.work_empty = False
            if self.work_empty and self.spec.outputs is None:
                return
        root_real = os.path.join(self.executor.work_root_real, self._name, "work")
        got = collect(self.work_dir, self._snapshot, self.spec.outputs, root_real=root_real)
        res.outputs = got.files
        if got.error:  # the outputs cannot come back as asked: the attempt fails
            res.error, res.outputs_failed = _join(res.error, got.error), True
        for msg in got.skipped:
            log.warning("event=output_skipped attempt=%d detail=%r", self.attempt_id, msg)
        self._evict_modified_links()

    def _evict_modified_links(self) -> None:
        """A hard-linked input written in place also changed the cache: drop that entry."""
        for rel, cache_path in self._linked.items():
            before = self._snapshot.get(rel)
            try:
                st = os.lstat(self.work_dir / rel)
                cst = os.stat(cache_path)
            except OSError:
                continue
            same_inode = before is not None and st.st_ino == before[0] == cst.st_ino
            if same_inode and before is not None and (st.st_size, st.st_mtime_ns) != before[1:]:
                log.warning("event=cache_evict attempt=%d path=%s", self.attempt_id, rel)
                with contextlib.suppress(OSError):
                    cache_path.unlink()

    def _finish(self, res: ExecResult) -> ExecResult:
        res.duration_s = time.monotonic() - self._t0 if self._t0 else 0.0
        with self._lock:
            self.result = res
        log.debug(
            "event=attempt_done attempt=%d outcome=%s exit=%s dur=%.3f",
            self.attempt_id,
            res.outcome,
            res.exit_code,
            res.duration_s,
        )
        return res


def _join(a: str | None, b: str) -> str:
    return b if not a else f"{a}; {b}"


class Executor(SandboxPool):
    """Creates executions under ``work_root``; shared blob cache; tracks running groups."""

    def __init__(
        self,
        work_root: Path,
        blob_dir: Path,
        fetch_blob: FetchBlob | None = None,
        *,
        base_env: Mapping[str, str] | None = None,
        kill_grace_s: float = 2.0,
        shell: str = "/bin/sh",
        subreaper: bool = True,
        max_spares: int = 32,
        ram_tolerance: float = DEFAULT_RAM_TOLERANCE,
        watch_interval_s: float = DEFAULT_WATCH_INTERVAL_S,
    ) -> None:
        self.work_root = Path(work_root)
        self.work_root.mkdir(parents=True, exist_ok=True)
        self.work_root_real = os.path.realpath(self.work_root)
        self._work_root_s = str(self.work_root)
        # one /dev/null for every child's stdin (Popen would open and close one per spawn)
        self.devnull = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        weakref.finalize(self, os.close, self.devnull)
        self.cleaner = SandboxCleaner()
        self.blobs = BlobCache(Path(blob_dir), fetch_blob)
        self.base_env = dict(os.environ if base_env is None else base_env)
        # encoded once: Popen would encode every variable of every task's environment
        self._base_env_b = {os.fsencode(k): os.fsencode(v) for k, v in self.base_env.items()}
        self.programs = ProgramCache()
        # RSS against ram_mb, OOM kills, progress, stuck attempts (herder.agent.watch).
        self.watcher = Watcher(interval_s=watch_interval_s, ram_tolerance=ram_tolerance)
        self.kill_grace_s = kill_grace_s
        self.shell = shell
        self._running: dict[int, Execution] = {}
        self._n_spawning = 0
        self._lock = threading.Lock()
        self._spares: list[str] = []  # recycled sandboxes (empty work/, two log files)
        self._spare_seq = 0
        self.max_spares = max_spares
        if subreaper:
            procs.become_subreaper()

    def execution(self, spec: ExecSpec) -> Execution:
        return Execution(self, spec)

    def run(self, spec: ExecSpec) -> tuple[Execution, ExecResult]:
        ex = self.execution(spec)
        return ex, ex.run()

    def sandbox_path(self, attempt_id: int) -> Path:
        return self.work_root / f"{SANDBOX_PREFIX}{attempt_id}"

    def reap_orphans(self) -> int:
        """Reap zombie orphans re-parented to the agent (call periodically)."""
        with self._lock:
            if self._n_spawning:
                return 0  # a fresh child may not be registered yet
            owned = {ex.pgid for ex in self._running.values() if ex.pgid is not None}
            return procs.reap_orphans(owned)

    def kill_all(self, outcome: Outcome = "released", reason: str = "agent shutting down") -> None:
        with self._lock:
            running = list(self._running.values())
        for ex in running:
            ex.cancel(outcome, reason)

    def _spawning(self, delta: int) -> None:
        with self._lock:
            self._n_spawning += delta

    def _register(self, ex: Execution) -> None:
        with self._lock:
            self._running[ex.attempt_id] = ex
        self.watcher.watch(ex)

    def _unregister(self, ex: Execution) -> None:
        self.watcher.unwatch(ex)
        with self._lock:
            self._running.pop(ex.attempt_id, None)


__all__ = [
    "SANDBOX_PREFIX",
    "SPARE_PREFIX",
    "STREAMS",
    "BlobCache",
    "ExecResult",
    "ExecSpec",
    "Execution",
    "Executor",
    "FetchBlob",
    "LogTail",
    "SandboxCleaner",
    "StagingError",
    "clone_file",
    "direct_argv",
    "rmtree_sandbox",
]
