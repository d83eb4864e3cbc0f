"""Process-group helpers: kill a whole group, wait until it is gone, reap orphans, RSS.

A task runs in its own session (``start_new_session=True``), so its process
group id is the leader's pid. Background children it leaves behind are killed
with the group. Orphaned grandchildren are re-parented to the nearest
*subreaper*; when the agent is one (Linux ``PR_SET_CHILD_SUBREAPER``) it reaps
their zombies itself, so a dead group really disappears even under an init
that never reaps (containers, micro-VMs).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import signal
import sys
import time
from collections.abc import Collection

log = logging.getLogger("herder.agent")

_PR_SET_CHILD_SUBREAPER = 36
_subreaper: bool | None = None


def become_subreaper() -> bool:
    """Make this process the reaper of its orphaned descendants (Linux only).

    Idempotent; returns whether it is in effect.
    """
    global _subreaper
    if _subreaper is not None:
        return _subreaper
    _subreaper = False
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0:
                _subreaper = True
        except OSError:  # pragma: no cover - exotic libc
            pass
    return _subreaper


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - a member changed uid; it exists
        return True
    return True


def signal_group(pgid: int, sig: int) -> bool:
    """Send ``sig`` to the group; False when the group no longer exists."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover
        return True
    return True


def _proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, pgrp) of a process from /proc, or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            data = fh.read()
    except OSError:
        return None
    # the command name is in parentheses and may itself contain spaces or ')'.
    rest = data[data.rfind(b")") + 2 :].split()
    try:
        return rest[0].decode(), int(rest[1]), int(rest[2])
    except (IndexError, ValueError):  # pragma: no cover
        return None


def _list_pids() -> list[int]:
    try:
        return [int(n) for n in os.listdir("/proc") if n.isdigit()]
    except OSError:  # pragma: no cover - no procfs
        return []


def reap_group_zombies(pgid: int) -> None:
    """waitpid() the zombies of group ``pgid`` that are our children (re-parented orphans)."""
    me = os.getpid()
    for pid in _list_pids():
        st = _proc_stat(pid)
        if st is None:
            continue
        state, ppid, pgrp = st
        if pgrp == pgid and ppid == me and state == "Z":
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(pid, os.WNOHANG)


def reap_orphans(exclude: set[int]) -> int:
    """Reap zombie children of this process that nobody else waits for.

    ``exclude`` holds the pids of children a ``Popen`` object owns (their
    status must stay for ``Popen.wait``). Returns how many were reaped.
    """
    me = os.getpid()
    n = 0
    for pid in _list_pids():
        if pid in exclude:
            continue
        st = _proc_stat(pid)
        if st is None or st[1] != me or st[0] != "Z":
            continue
        with contextlib.suppress(ChildProcessError, OSError):
            done, _ = os.waitpid(pid, os.WNOHANG)
            n += done != 0
    return n


def group_rss(pgids: Collection[int]) -> dict[int, int]:
    """Resident set size in bytes of each process group in ``pgids``: the sum over its members.

    One pass over the process table (``psutil``; one ``getpgid`` per process,
    one ``statm`` read per member). A group with no member using memory
    (gone, or only zombies) is absent.
    """
    import psutil

    want = set(pgids)
    out: dict[int, int] = {}
    for pid in psutil.pids():
        try:
            pgid = os.getpgid(pid)
        except OSError:  # gone meanwhile
            continue
        if pgid not in want:
            continue
        try:
            rss = psutil.Process(pid).memory_info().rss
        except psutil.Error:  # gone meanwhile
            continue
        if rss:  # a zombie has none (and its group may be dying): no sample
            out[pgid] = out.get(pgid, 0) + rss
    return out


def kill_group_and_wait(pgid: int, timeout: float = 5.0) -> bool:
    """SIGKILL every member of the group and wait until none is left.

    The leader must already be reaped by its ``Popen``. Returns True when the
    group is gone. The fast path (no leftovers) costs one system call.
    """
    if not signal_group(pgid, signal.SIGKILL):
        return True
    deadline = time.monotonic() + timeout
    delay = 0.001
    while True:
        reap_group_zombies(pgid)
        if not group_alive(pgid):
            return True
        if time.monotonic() >= deadline:
            log.warning("event=group_linger pgid=%d", pgid)
            return False
        signal_group(pgid, signal.SIGKILL)
        time.sleep(delay)
        delay = min(delay * 2, 0.05)
