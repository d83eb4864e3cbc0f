"""Watch running attempts (issue 13): RSS against ``ram_mb``, OOM kills, progress, stuck.

One thread per executor (started with the first attempt) ticks every
``interval_s`` while attempts run, and sleeps otherwise:

- **Memory.** The resident set size of an attempt's process group is the sum
  of its members' RSS (``psutil``; the members are found by process group,
  so orphans re-parented to the agent still count; a process that left the
  group with ``setsid`` escapes the watch, as it escapes the group kill). An
  attempt whose task has a ``ram_mb`` is sampled every tick and killed with
  SIGKILL (no grace: it is growing) once its RSS passes ``ram_mb`` by more
  than ``ram_tolerance`` (default 10 %). RSS counts shared pages once per
  process, so a group of forked workers sharing memory reads high. An
  attempt without a limit is sampled once it has run ``sample_after_s``,
  only to know its peak should the kernel kill it.
- **The kernel's OOM kill** cannot be told apart from any other SIGKILL for
  certain without the kernel log (``/dev/kmsg`` needs privileges). What is
  detectable, and used: the attempt died of SIGKILL (or its shell reported
  137) that herder did not send, and either an OOM-kill counter rose while
  it ran (``oom_kill`` in ``/proc/vmstat``, host-wide, and in the agent's
  memory cgroup: v2 ``memory.events``, v1 ``memory.oom_control``), or its
  last RSS sample was within 90 % of its ``ram_mb``. So a ``kill -9`` by
  someone else while an unrelated OOM kill happened on the host is taken for
  an OOM kill too; an OOM kill the counters do not show (an old kernel, an
  unreadable cgroup) of a task without a limit is not recognised.
- **Progress.** With a ``progress_pattern`` the new output of both streams is
  read from the log files (its own offsets: the log shipper's reads are not
  disturbed), split into lines and matched (``herder.taskwatch``); the
  latest value is ``Execution.progress``. At most the last 64 KiB of what a
  tick finds is read.
- **Stuck.** With a ``stuck_timeout_s`` an attempt whose two log files have
  not grown for that long is killed (SIGTERM, then SIGKILL after the grace)
  as a command failure: ``stuck: no output for N s``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from herder.agent import procs
from herder.agent.files import open_log
from herder.taskwatch import compile_progress, progress_of

if TYPE_CHECKING:
    from herder.agent.executor import Execution

log = logging.getLogger("herder.agent")

MB = 1024 * 1024
DEFAULT_WATCH_INTERVAL_S = 0.25
DEFAULT_RAM_TOLERANCE = 0.10
DEFAULT_SAMPLE_AFTER_S = 1.0
NEAR_LIMIT = 0.9  # a SIGKILL with the RSS this close to the limit is taken for the OOM killer
PROGRESS_READ_MAX = 64 * 1024
PROGRESS_REPORT_S = 1.0  # at most this often, a progress change asks for an early heartbeat
_STREAMS: tuple[Literal["stdout"], Literal["stderr"]] = ("stdout", "stderr")


RAM_TOLERANCE_ENV = "HERDER_RAM_TOLERANCE"


def ram_tolerance_from_env(env: Mapping[str, str] | None = None) -> float:
    """``$HERDER_RAM_TOLERANCE`` (a fraction, 0-1), else the default; ValueError names it."""
    text = (os.environ if env is None else env).get(RAM_TOLERANCE_ENV, "").strip()
    if not text:
        return DEFAULT_RAM_TOLERANCE
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 1:
        raise ValueError(f"{RAM_TOLERANCE_ENV}={text!r}: expected a fraction from 0 to 1")
    return value


# ------------------------------------------------------------- OOM counters


def _cgroup_oom_file() -> str | None:
    """The agent's memory cgroup file that counts OOM kills (v2 or v1), if readable."""
    try:
        with open("/proc/self/cgroup") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return None
    candidates: list[str] = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        path = path.lstrip("/")
        if controllers == "":  # cgroup v2
            candidates += [
                os.path.join("/sys/fs/cgroup", path, "memory.events"),
                "/sys/fs/cgroup/memory.events",
            ]
        elif "memory" in controllers.split(","):  # v1
            candidates += [
                os.path.join("/sys/fs/cgroup/memory", path, "memory.oom_control"),
                "/sys/fs/cgroup/memory/memory.oom_control",
            ]
    for c in candidates:
        if _read_counter(c, "oom_kill") is not None:
            return c
    return None


def _read_counter(path: str, name: str) -> int | None:
    try:
        with open(path, "rb") as fh:
            for line in fh:
                key, _, value = line.partition(b" ")
                if key == name.encode():
                    return int(value)
    except (OSError, ValueError):
        return None
    return None


_CGROUP_FILE: list[str | None] = []  # resolved once, on first use


def oom_counters() -> tuple[int | None, int | None]:
    """(host-wide OOM kills, OOM kills in the agent's memory cgroup); None: not readable."""
    if not _CGROUP_FILE:
        _CGROUP_FILE.append(_cgroup_oom_file())
    cg = _CGROUP_FILE[0]
    return _read_counter("/proc/vmstat", "oom_kill"), (
        _read_counter(cg, "oom_kill") if cg else None
    )


def _rose(before: tuple[int | None, int | None], after: tuple[int | None, int | None]) -> bool:
    return any(
        b is not None and a is not None and a > b for b, a in zip(before, after, strict=True)
    )


# ------------------------------------------------------------ per attempt


@dataclass
class WatchState:
    """What the watcher knows of one running attempt."""

    ram_limit_mb: int
    stuck_s: float | None
    progress_rx: re.Pattern[str] | None
    started: float
    oom_base: tuple[int | None, int | None]
    peak_b: int = 0
    last_rss_b: int = 0
    sizes: tuple[int, int] = (0, 0)
    last_output: float = 0.0
    progress: float | None = None
    offsets: dict[str, int] = field(default_factory=lambda: dict.fromkeys(_STREAMS, 0))
    partial: dict[str, str] = field(default_factory=lambda: dict.fromkeys(_STREAMS, ""))

    @property
    def peak_mb(self) -> int | None:
        return -(-self.peak_b // MB) if self.peak_b else None


class Watcher:
    """The executor's watch thread (module doc)."""

    def __init__(
        self,
        *,
        interval_s: float = DEFAULT_WATCH_INTERVAL_S,
        ram_tolerance: float = DEFAULT_RAM_TOLERANCE,
        sample_after_s: float = DEFAULT_SAMPLE_AFTER_S,
    ) -> None:
        if interval_s <= 0:
            raise ValueError("watch interval must be positive")
        if not 0 <= ram_tolerance <= 1:
            raise ValueError("RAM tolerance must be between 0 and 1")
        self.interval_s = interval_s
        self.ram_tolerance = ram_tolerance
        self.sample_after_s = sample_after_s
        self.on_progress: Callable[[], None] | None = None  # e.g. heartbeat now
        self._watched: dict[int, Execution] = {}
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._oom_cache: tuple[float, tuple[int | None, int | None]] = (-1e9, (None, None))
        self._last_report = 0.0
        self._report_pending = False

    # -- registration (the executor's start() and wait())

    def watch(self, ex: Execution) -> None:
        spec = ex.spec
        now = time.monotonic()
        ex.watch = WatchState(
            ram_limit_mb=spec.ram_mb,
            stuck_s=spec.stuck_timeout_s,
            progress_rx=compile_progress(spec.progress_pattern) if spec.progress_pattern else None,
            started=now,
            oom_base=self._oom_baseline(now),
            last_output=now,
        )
        with self._cond:
            self._watched[ex.attempt_id] = ex
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="herder-watch", daemon=True)
                self._thread.start()
            elif len(self._watched) == 1:
                self._cond.notify()

    def unwatch(self, ex: Execution) -> None:
        with self._cond:
            self._watched.pop(ex.attempt_id, None)

    def finish(self, ex: Execution, returncode: int, herder_killed: bool) -> str | None:
        """After the attempt's process ended: read its last progress; an OOM verdict or None.

        The verdict (the attempt's error text) says the kernel's OOM killer
        took it; None: an ordinary exit (module doc: what is detectable).
        """
        ws = ex.watch
        if ws is None:
            return None
        if ws.progress_rx is not None:
            with contextlib.suppress(OSError):
                self._read_progress(ex, ws, final=True)
        if herder_killed or returncode not in (-signal.SIGKILL, 128 + signal.SIGKILL):
            return None
        limit = ws.ram_limit_mb
        rose = _rose(ws.oom_base, oom_counters())
        near = limit > 0 and ws.last_rss_b >= NEAR_LIMIT * limit * MB
        if not (rose or near):
            return None
        peak = f"peak {ws.peak_mb} MB" if ws.peak_mb else "peak not sampled"
        lim = f"limit {limit} MB" if limit else "no limit"
        why = "an OOM kill was counted while it ran" if rose else "its RSS was near its limit"
        return f"killed by the kernel's OOM killer (SIGKILL; {why}; {peak}, {lim})"

    # -- the thread

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._watched:
                    self._cond.wait()
            time.sleep(self.interval_s)
            try:
                self.tick()
            except Exception:  # the watch must not die of one odd process
                log.exception("event=watch_error")

    def tick(self, now: float | None = None) -> None:
        """One round over the running attempts (the thread's body; tests call it)."""
        now = time.monotonic() if now is None else now
        with self._cond:
            running = [ex for ex in self._watched.values() if ex.watch is not None and ex.running]
        self._oom_baseline(now, refresh=True)
        sample = {
            ex.pgid: ex
            for ex in running
            if ex.pgid is not None
            and ex.watch is not None
            and (ex.watch.ram_limit_mb > 0 or now - ex.watch.started >= self.sample_after_s)
        }
        rss = procs.group_rss(sample) if sample else {}
        changed = False
        for ex in running:
            ws = ex.watch
            assert ws is not None
            if ex.pgid in rss:
                self._check_memory(ex, ws, rss[ex.pgid])
            if ws.stuck_s is not None or ws.progress_rx is not None:
                changed |= self._check_output(ex, ws, now)
        # A change too soon after the last report waits for a later tick, not the next change.
        self._report_pending |= changed
        if (
            self._report_pending
            and self.on_progress is not None
            and now - self._last_report >= PROGRESS_REPORT_S
        ):
            self._report_pending = False
            self._last_report = now
            self.on_progress()

    def _oom_baseline(self, now: float, refresh: bool = False) -> tuple[int | None, int | None]:
        """OOM counters, from the last tick when it is recent (no file reads per spawn)."""
        at, counts = self._oom_cache
        if refresh or now - at > 2 * self.interval_s:
            counts = oom_counters()
            self._oom_cache = (now, counts)
        return counts

    def _check_memory(self, ex: Execution, ws: WatchState, rss_b: int) -> None:
        ws.last_rss_b = rss_b
        ws.peak_b = max(ws.peak_b, rss_b)
        limit = ws.ram_limit_mb
        if limit <= 0 or rss_b <= limit * MB * (1 + self.ram_tolerance):
            return
        peak = ws.peak_mb
        log.warning(
            "event=ram_exceeded attempt=%d rss_mb=%d limit_mb=%d", ex.attempt_id, peak, limit
        )
        ex.cancel(
            "memory",
            f"exceeded its ram_mb of {limit} MB (peak RSS {peak} MB, "
            f"{self.ram_tolerance:.0%} tolerance): killed",
            kill_now=True,
        )

    def _check_output(self, ex: Execution, ws: WatchState, now: float) -> bool:
        """Stuck check and progress; True when the progress changed."""
        try:
            sizes = (
                os.stat(ex.log_path_s("stdout")).st_size,
                os.stat(ex.log_path_s("stderr")).st_size,
            )
        except OSError:
            return False
        if sizes != ws.sizes:
            ws.sizes = sizes
            ws.last_output = now
            if ws.progress_rx is not None:
                before = ws.progress
                self._read_progress(ex, ws)
                return ws.progress != before
            return False
        if ws.stuck_s is not None and now - ws.last_output >= ws.stuck_s:
            log.warning("event=attempt_stuck attempt=%d after_s=%g", ex.attempt_id, ws.stuck_s)
            ex.cancel("timeout", f"stuck: no output for {ws.stuck_s:g} s")
        return False

    def _read_progress(self, ex: Execution, ws: WatchState, final: bool = False) -> None:
        assert ws.progress_rx is not None
        for s in _STREAMS:
            log_file = open_log(ex.log_path_s(s))  # not a symlink's target, not a FIFO
            if log_file is None:
                continue
            with log_file as fh:
                size = os.fstat(fh.fileno()).st_size
                start = ws.offsets[s]
                if size <= start and not (final and ws.partial[s]):
                    continue
                skipped = size - start > PROGRESS_READ_MAX
                if skipped:  # read the tail only; its first line is a fragment
                    start = size - PROGRESS_READ_MAX
                fh.seek(start)
                data = fh.read(max(size - start, 0))
            ws.offsets[s] = start + len(data)
            text = data.decode("utf-8", "replace")
            if skipped:
                text = text.split("\n", 1)[1] if "\n" in text else ""
                ws.partial[s] = ""
            lines = (ws.partial[s] + text).replace("\r", "\n").split("\n")
            ws.partial[s] = "" if final else lines.pop()[-4096:]
            for line in reversed(lines):  # the latest matching line wins
                value = progress_of(ws.progress_rx, line)
                if value is not None:
                    ws.progress = value
                    break


__all__ = [
    "DEFAULT_RAM_TOLERANCE",
    "DEFAULT_WATCH_INTERVAL_S",
    "WatchState",
    "Watcher",
    "oom_counters",
    "ram_tolerance_from_env",
]
