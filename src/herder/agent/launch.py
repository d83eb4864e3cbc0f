"""Starting a task's command: direct exec or ``/bin/sh -c``, its environment, PATH cache.

Moved out of ``herder.agent.executor`` (which runs attempts in sandboxes):
everything here is about turning a command and an environment into a child
process in its own session, as cheaply as possible (DESIGN §10).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping

WHICH_TTL_S = 5.0  # how long a resolved program path is trusted

# Characters that make a command string need a shell (GNU make's list:
# quoting, globbing, redirection, expansion, control operators, newlines).
_SHELL_CHARS = frozenset("#;\"'*?[]&|<>(){}$`^~!\\\n\r")
# Words that are shell syntax or builtins with no program of that name.
_SHELL_WORDS_TEXT = """! . : [[ ]] { } alias bg break case cd command continue declare do done
elif else esac eval exec exit export fc fg fi for function getopts hash if in jobs let local
logout popd pushd read readonly return select set shift shopt source suspend then time times
trap type typeset ulimit umask unalias unset until wait while"""
_SHELL_WORDS = frozenset(_SHELL_WORDS_TEXT.split())


def direct_argv(command: str) -> list[str] | None:
    """The argv to exec directly when ``command`` needs no shell, else None.

    Like make: a string with no shell metacharacters whose first word is not
    shell syntax is split on blanks and exec'd without ``/bin/sh -c``.
    """
    if any(c in _SHELL_CHARS for c in command):
        return None
    argv = command.split()
    if not argv or argv[0] in _SHELL_WORDS or "=" in argv[0]:
        return None  # empty, shell syntax or builtin, or a variable assignment
    return argv


def signame(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


def shell_code(rc: int) -> int:
    """Popen's returncode as a shell would report it (signal n → 128 + n)."""
    return rc if rc >= 0 else 128 - rc


class CommandNotRunnable(Exception):
    """The command cannot start (not found, not executable): the shell's 127 or 126."""

    def __init__(self, code: int, msg: str) -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg


class ProgramCache:
    """Resolved program paths, trusted ``WHICH_TTL_S`` seconds (spares exec's PATH walk)."""

    def __init__(self) -> None:
        self._cache: dict[tuple[str, str | None], tuple[str, float]] = {}

    def which(self, name: str, path: str | None) -> str | None:
        """``name``'s absolute path on ``path`` (cached a few seconds), or None: let exec search.

        Only bare names and absolute PATH entries (relative ones depend on
        the child's cwd).
        """
        if "/" in name:
            return None
        key = (name, path)
        now = time.monotonic()
        hit = self._cache.get(key)
        if hit is not None and now - hit[1] < WHICH_TTL_S:
            return hit[0]
        search = os.defpath if path is None else path
        if any(not d.startswith("/") for d in search.split(os.pathsep)):
            return None
        found = shutil.which(name, path=search)
        if found is None:
            self._cache.pop(key, None)
            return None
        if len(self._cache) > 1024:
            self._cache.clear()
        self._cache[key] = (found, now)
        return found

    def forget(self, name: str, path: str | None) -> None:
        self._cache.pop((name, path), None)


def child_env(
    base_b: Mapping[bytes, bytes],
    env: Mapping[str, str],
    attempt_id: int,
    task_id: int | None,
    job_id: int | None,
    work_s: str,
) -> dict[bytes, bytes]:
    """The child's environment, as bytes (``base_b`` is encoded once per executor)."""
    fs = os.fsencode
    out = dict(base_b)
    for k, v in env.items():
        out[fs(k)] = fs(v)
    out[b"HERDER_ATTEMPT_ID"] = b"%d" % attempt_id
    if task_id is not None:
        out[b"HERDER_TASK_ID"] = b"%d" % task_id
    if job_id is not None:
        out[b"HERDER_JOB_ID"] = b"%d" % job_id
    work = fs(work_s)
    out[b"HERDER_JOB_ROOT"] = work
    out[b"PWD"] = work
    return out


def spawn(
    cmd: str | list[str],
    *,
    env: dict[bytes, bytes],
    cwd: str,
    stdin: int,
    stdout: int,
    stderr: int,
    shell: str,
    path: str | None,
    programs: ProgramCache,
) -> subprocess.Popen[bytes]:
    """Start ``cmd`` in its own session: exec'd directly when it needs no shell.

    ``path`` is the PATH the child gets (for the program cache). Raises
    CommandNotRunnable when a directly exec'd program cannot start, OSError
    for anything else.
    """
    direct: list[str] | None
    if isinstance(cmd, list):
        direct, shell_fallback = list(cmd), None
    else:
        direct, shell_fallback = direct_argv(cmd), cmd

    def popen(argv: list[str], executable: str | None = None) -> subprocess.Popen[bytes]:
        # close_fds and start_new_session cost nothing measurable next to fork/exec
        # (vfork, close_range); an absolute ``executable`` spares the PATH walk.
        return subprocess.Popen(
            argv,
            executable=executable,
            cwd=cwd,
            env=env,
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            close_fds=True,
            start_new_session=True,
        )

    if direct is None:
        assert isinstance(cmd, str)
        return popen([shell, "-c", cmd])
    try:
        resolved = programs.which(direct[0], path)
        if resolved is not None:
            try:
                return popen(direct, resolved)
            except OSError:  # gone or changed since it was cached: search again
                programs.forget(direct[0], path)
        return popen(direct)
    except FileNotFoundError:
        raise CommandNotRunnable(127, f"{direct[0]}: command not found") from None
    except PermissionError:
        raise CommandNotRunnable(126, f"{direct[0]}: permission denied") from None
    except OSError as exc:
        if shell_fallback is not None:  # e.g. ENOEXEC: a script without '#!'
            return popen([shell, "-c", shell_fallback])
        raise CommandNotRunnable(126, f"{direct[0]}: {exc.strerror or exc}") from None


__all__ = [
    "WHICH_TTL_S",
    "CommandNotRunnable",
    "ProgramCache",
    "child_env",
    "direct_argv",
    "shell_code",
    "signame",
    "spawn",
]
