"""Shared helpers of the benchmarks: timed runs with the CPU of a whole process
tree, baselines (xargs, distccd, spawn floor), loopback ports, cleanup.

Every bench process makes itself a child subreaper (Linux), so a process that
a measured command leaves behind (a daemon, an orphaned agent) is re-parented
to the bench: it is counted, reported as a straggler, reaped (its CPU lands in
RUSAGE_CHILDREN) or killed, and never outlives the bench.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
INSTALL_HINT = (
    "run `make bench` (installs .[test,bench] into .venv and runs "
    "scripts/ensure-bench-deps.sh), or: .venv/bin/pip install -e '.[test,bench]' "
    "&& sudo bash scripts/ensure-bench-deps.sh"
)

_PR_SET_CHILD_SUBREAPER = 36
# Long-lived helpers this bench started (servers, farms): never treated as
# stragglers of a measured command; stopped by their owners (or at exit).
_helpers: set[int] = set()


def register_helper(pid: int) -> None:
    _helpers.add(pid)


def unregister_helper(pid: int) -> None:
    _helpers.discard(pid)


def setup_process() -> None:
    """Subreaper, SIGTERM -> SystemExit (so `finally` blocks clean up), and an
    exit hook that kills whatever descendants are still alive."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)

    def _term(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _term)
    atexit.register(kill_descendants)
    # Measure herder as an installed user runs it: with its bytecode cached. Some
    # shells (this project's sandbox among them) export PYTHONDONTWRITEBYTECODE,
    # which makes every start recompile herder's ~100 source modules (~0.1 s); pip
    # compiles site-packages at install, and so do we for herder's own source here.
    if os.environ.pop("PYTHONDONTWRITEBYTECODE", None) is not None:
        print("(bench: PYTHONDONTWRITEBYTECODE unset, so herder's bytecode is cached)")
    import compileall

    compileall.compile_dir(str(ROOT / "src" / "herder"), quiet=1)


def _psutil():  # type: ignore[no-untyped-def]
    try:
        import psutil
    except ImportError:
        sys.exit(f"psutil is missing: {INSTALL_HINT}")
    return psutil


def descendants(exclude: Sequence[int] = ()) -> list[int]:
    psutil = _psutil()
    skip: set[int] = set()
    for pid in [*exclude, *_helpers]:
        skip.add(pid)
        with contextlib.suppress(psutil.Error):
            skip.update(c.pid for c in psutil.Process(pid).children(recursive=True))
    try:
        kids = psutil.Process().children(recursive=True)
    except psutil.Error:
        return []
    return [c.pid for c in kids if c.pid not in skip]


def _reap(pid: int) -> bool:
    """Reap pid if it is our child and has exited; True when it is gone."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == pid
    except ChildProcessError:
        psutil = _psutil()
        return not psutil.pid_exists(pid) or _zombie_elsewhere(pid)


def _zombie_elsewhere(pid: int) -> bool:
    psutil = _psutil()
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return True


def settle_stragglers(exclude: Sequence[int] = (), grace: float = 5.0) -> list[str]:
    """Wait up to `grace` s for descendants not in `exclude` to exit (reaping
    them), then SIGKILL the rest. Returns a description of each straggler."""
    psutil = _psutil()
    found = descendants(exclude)
    if not found:
        return []
    names = []
    for pid in found:
        with contextlib.suppress(psutil.Error):
            names.append(f"{pid} {' '.join(psutil.Process(pid).cmdline())[:80]}")
    deadline = time.monotonic() + grace
    pending = set(found)
    while pending and time.monotonic() < deadline:
        pending = {p for p in pending if not _reap(p)}
        if pending:
            time.sleep(0.05)
    for pid in pending:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    for pid in pending:
        end = time.monotonic() + 5
        while time.monotonic() < end and not _reap(pid):
            time.sleep(0.02)
    return names


def kill_descendants() -> None:
    """SIGTERM, then SIGKILL, every process still below this one (ours only)."""
    _helpers.clear()
    try:
        pids = descendants()
    except SystemExit:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        end = time.monotonic() + 3
        while pids and time.monotonic() < end:
            pids = [p for p in pids if not _reap(p)]
            if pids:
                time.sleep(0.05)
        if not pids:
            return


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes] | None, wait: float = 15.0) -> None:
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listening on 127.0.0.1:{port} after {wait}s")


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def self_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def tree_cpu(pid: int) -> float:
    """CPU s (user+sys) of a live process, its live descendants, and the
    children they have reaped."""
    psutil = _psutil()
    total = 0.0
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0.0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
    return total


def tree_rss(pid: int) -> int:
    """Sum of the RSS of a process and all its live descendants (bytes)."""
    psutil = _psutil()
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss
    return total


@dataclass
class Run:
    argv: list[str]
    wall: float
    cpu: float  # user+sys of the process and every descendant reaped (children rusage)
    rc: int | None  # None: killed at the timeout
    stdout: str
    stderr: str
    stragglers: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.rc == 0

    def failure(self, tail: int = 1500) -> str:
        what = "timed out" if self.rc is None else f"exit status {self.rc}"
        return (
            f"{' '.join(self.argv[:6])} ... {what}\n"
            f"--- stdout (tail)\n{self.stdout[-tail:]}\n--- stderr (tail)\n{self.stderr[-tail:]}"
        )


def bench_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("HERDER_MASTER", None)
    env.update(extra)
    return env


def run_measured(
    argv: list[str],
    cwd: Path | None = None,
    *,
    env: dict[str, str] | None = None,
    timeout: float = 600.0,
    stdin: bytes | None = None,
    keep: Sequence[int] = (),
    stdout_path: Path | None = None,
) -> Run:
    """Run argv to completion; wall time and children-rusage CPU delta (the
    command and all its descendants). Stragglers it leaves are waited for
    (and counted) or killed. `keep`: our long-lived helpers (servers) to
    leave alone. `stdout_path`: send stdout to this file (large outputs)."""
    cpu0 = children_cpu()
    out_f = open(stdout_path, "wb") if stdout_path else None  # noqa: SIM115
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        argv,
        cwd=cwd,
        env=env if env is not None else bench_env(),
        stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
        stdout=out_f if out_f else subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    rc: int | None
    try:
        out, err = proc.communicate(stdin, timeout=timeout)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        rc = None
    finally:
        if out_f:
            out_f.close()
    wall = time.perf_counter() - t0
    stragglers = settle_stragglers(keep, grace=5.0)
    cpu = children_cpu() - cpu0
    text = out.decode(errors="replace") if out else ""
    return Run(argv, wall, cpu, rc, text, err.decode(errors="replace"), stragglers)


def xargs_true(n: int, parallel: int, timeout: float = 600.0) -> Run:
    """n runs of `true`, `parallel` at a time, by xargs."""
    data = "\n".join(str(i) for i in range(n)).encode() + b"\n"
    return run_measured(["xargs", f"-P{parallel}", "-n1", "true"], stdin=data, timeout=timeout)


def spawn_floor(n: int) -> float:
    """CPU s per spawn of `true` the way the agent spawns a task's command
    (new session, stdin from /dev/null, stdout/stderr to a file), waited for,
    in this process: parent-side fork/exec/wait cost plus the child's own."""
    with tempfile.TemporaryFile() as f:
        fd = f.fileno()
        c0, s0 = children_cpu(), self_cpu()
        for _ in range(n):
            p = subprocess.Popen(
                ["true"],
                start_new_session=True,
                stdin=subprocess.DEVNULL,
                stdout=fd,
                stderr=fd,
            )
            p.wait()
        return (children_cpu() - c0 + self_cpu() - s0) / n


def herder_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "herder", *args]


def herder_importable() -> str | None:
    """None when `python -m herder --help` works, else why not (others may be mid-change)."""
    r = subprocess.run(
        herder_cmd("--help"), capture_output=True, text=True, env=bench_env(), timeout=60
    )
    if r.returncode == 0:
        return None
    return f"`python -m herder --help` exit {r.returncode}: {r.stderr.strip()[-800:]}"


def write_true_rakefile(d: Path, actions: int, name: str = "a") -> Path:
    d.mkdir(parents=True, exist_ok=True)
    path = d / "Rakefile"
    with open(path, "w") as f:
        f.write(f"{name}:\n")
        f.write("\tremote-true\n" * actions)
    return path


def herder_log_tail(d: Path, limit: int = 3000) -> str:
    out = []
    logs = d / ".herder" / "logs"
    if logs.is_dir():
        for p in sorted(logs.iterdir()):
            with contextlib.suppress(OSError):
                out.append(f"--- {p.name} (tail)\n{p.read_text(errors='replace')[-limit:]}")
    return "\n".join(out)


# ---------------------------------------------------------------- distccd


class Distccd:
    """A distccd of our own on 127.0.0.1 (free port, --allow 127.0.0.1),
    logging to a file, so every compile it served can be counted."""

    def __init__(self, jobs: int = 2, workdir: Path | None = None) -> None:
        self.jobs = jobs
        self.port = free_port()
        self._tmp = tempfile.mkdtemp(prefix="herder-bench-distccd-", dir=workdir)
        self.log_path = Path(self._tmp) / "distccd.log"
        (Path(self._tmp) / "client").mkdir()
        self.proc: subprocess.Popen[bytes] | None = None

    @staticmethod
    def missing() -> str | None:
        absent = [b for b in ("distcc", "distccd") if shutil.which(b) is None]
        if absent:
            return f"{' and '.join(absent)} not found: {INSTALL_HINT}"
        return None

    def __enter__(self) -> Distccd:
        log = open(self.log_path, "wb")
        try:
            self.proc = subprocess.Popen(
                [
                    "distccd",
                    "--no-detach",
                    "--daemon",
                    "--listen",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    "--allow",
                    "127.0.0.1",
                    "--jobs",
                    str(self.jobs),
                    "--log-stderr",
                    "--log-level",
                    "info",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        finally:
            log.close()
        register_helper(self.proc.pid)
        try:
            wait_port(self.port, self.proc)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            psutil = _psutil()
            try:
                pool = [c.pid for c in psutil.Process(self.proc.pid).children(recursive=True)]
            except psutil.Error:
                pool = []
            # Its pool children (in its process group) go with it; orphans
            # re-parented to us (subreaper) are reaped below.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
            end = time.monotonic() + 3
            while pool and time.monotonic() < end:
                pool = [p for p in pool if not _reap(p)]
                if pool:
                    time.sleep(0.02)
            unregister_helper(self.proc.pid)
        shutil.rmtree(self._tmp, ignore_errors=True)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def env(self, **extra: str) -> dict[str, str]:
        """Client environment: only this distccd, and no silent local fallback."""
        return bench_env(
            DISTCC_HOSTS=f"127.0.0.1:{self.port}/{self.jobs}",
            DISTCC_FALLBACK="0",
            DISTCC_DIR=str(Path(self._tmp) / "client"),
            **extra,
        )

    def compiles(self) -> int:
        """Compiles distccd has completed successfully (COMPILE_OK lines)."""
        try:
            return len(re.findall(rb"COMPILE_OK", self.log_path.read_bytes()))
        except OSError:
            return 0

    def cpu(self) -> float:
        return tree_cpu(self.pid)


# ---------------------------------------------------------------- printing


def med_min(xs: Sequence[float]) -> tuple[float, float]:
    return statistics.median(xs), min(xs)


def verdict(value: float, limit: float, *, at_least: bool = False) -> str:
    ok = value >= limit if at_least else value <= limit
    return "MET" if ok else "MISSED"


@contextlib.contextmanager
def tempdir(prefix: str) -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


# ---------------------------------------------------------------- PostgreSQL


def _tests_pg():  # type: ignore[no-untyped-def]
    """tests/pg.py (throwaway clusters for the test suite), reused."""
    tests = str(ROOT / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    import pg

    return pg


@dataclass
class PgCluster:
    dsn: str  # maintenance database, libpq URL
    postmaster: int  # pid: tree_cpu(postmaster) is the server's CPU


@contextlib.contextmanager
def durable_pg_cluster() -> Iterator[PgCluster]:
    """A throwaway PostgreSQL cluster on a free loopback port, started the way
    tests/pg.py starts one (its helpers: binaries, the postgres user when
    root, trust auth) but with durable commits: fsync, synchronous_commit and
    full_page_writes on."""
    pg = _tests_pg()
    bindir = pg.find_pg_bin()
    user: str | None = None
    base = Path(tempfile.mkdtemp(prefix="herder-bench-pg-"))
    if os.geteuid() == 0:
        import pwd

        user = "postgres"
        try:
            pw = pwd.getpwnam(user)
        except KeyError:
            shutil.rmtree(base, ignore_errors=True)
            raise pg.PostgresUnavailable("running as root without a 'postgres' user") from None
        os.chown(base, pw.pw_uid, pw.pw_gid)
    base.chmod(0o700)
    data = base / "data"
    port = free_port()
    db_user = user or "postgres"
    started = False
    postmaster = 0
    try:
        pg._run(
            [
                str(bindir / "initdb"),
                "-D",
                str(data),
                "-U",
                db_user,
                "-A",
                "trust",
                "--encoding=UTF8",
            ],
            user,
        )
        opts = (
            f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={base} "
            "-c fsync=on -c synchronous_commit=on -c full_page_writes=on "
            "-c max_connections=300 -c shared_buffers=64MB"
        )
        pg._run(
            [
                str(bindir / "pg_ctl"),
                "-D",
                str(data),
                "-l",
                str(base / "log"),
                "-o",
                opts,
                "-w",
                "start",
            ],
            user,
        )
        started = True
        # pg_ctl's postmaster is re-parented to this (subreaper) process: a
        # helper, not a straggler of the next measured command.
        postmaster = int((data / "postmaster.pid").read_text().split()[0])
        register_helper(postmaster)
        yield PgCluster(f"postgresql://{db_user}@127.0.0.1:{port}/postgres", postmaster)
    finally:
        if started:
            subprocess.run(
                pg._as_user(
                    [str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"], user
                ),
                capture_output=True,
                check=False,
                timeout=60,
            )
            if postmaster:
                unregister_helper(postmaster)
                end = time.monotonic() + 10
                while time.monotonic() < end and not _reap(postmaster):
                    time.sleep(0.05)
        shutil.rmtree(base, ignore_errors=True)


def pg_settings(dsn: str) -> str:
    import psycopg

    with psycopg.connect(dsn) as conn:
        vals = [
            f"{k}={conn.execute(f'SHOW {k}').fetchone()[0]}"  # type: ignore[index]
            for k in ("fsync", "synchronous_commit", "full_page_writes")
        ]
    return ", ".join(vals)


_load_at_start = os.getloadavg()


def load_note() -> str:
    """The machine's load around this run (other work skews every row alike
    only roughly: quote figures with it)."""
    end = os.getloadavg()
    return (
        f"machine: {os.cpu_count()} CPUs; load average (1 min) {_load_at_start[0]:.2f} at start, "
        f"{end[0]:.2f} at end"
    )
