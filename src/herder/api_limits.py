"""Bounds of what the master API accepts (issue 11): refused at the door, never stored.

Shared by the master (its models and middleware) and the CLI: a job the
CLI builds can be checked against the same limits before it is sent. Each
limit sits below what would make an accepted task fail forever on an agent
(the kernel's argument limits, the agent's timer) or a master fall over
(64-bit database integers, memory).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Annotated, Any

from pydantic import Field

#: The largest integer a database column holds (BIGINT); ids and counters above it
#: would overflow the driver, so the API refuses them (422) instead of a 500.
INT64_MAX = (1 << 63) - 1
Int64 = Annotated[int, Field(ge=-INT64_MAX - 1, le=INT64_MAX)]
RowId = Annotated[int, Field(ge=0, le=INT64_MAX)]

#: One string of a command (a shell command, one argv element, one ``KEY=value``
#: of its environment) in UTF-8 bytes: below Linux's MAX_ARG_STRLEN (128 KiB).
COMMAND_STRING_MAX = 120 * 1024
#: A command's argv and environment together, in UTF-8 bytes (with a NUL each):
#: well below ARG_MAX (a quarter of an 8 MiB stack, 2 MiB).
COMMAND_TOTAL_MAX = 1024 * 1024
#: The longest ``timeout_s`` a task may ask for: 30 days.
TIMEOUT_MAX_S = 30 * 86400.0
#: The most RAM a task may ask for, in MB (64 TiB).
RAM_MB_MAX = 1 << 26
#: Default bound of tasks in one job (``MasterConfig.max_tasks_per_job``).
MAX_TASKS_PER_JOB = 100_000
#: Default bound of a JSON request body (``MasterConfig.max_body_bytes``).
MAX_BODY_BYTES = 32 * 1024 * 1024
#: A printable-ASCII attempt token (they are ``secrets.token_urlsafe``).
Token = Annotated[str, Field(min_length=1, max_length=100, pattern=r"^[!-~]+$")]

_ENV_NAME = re.compile(r"^[^=\x00]+$")


def _utf8_size(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def command_problem(command: str | list[str]) -> str | None:
    """Why ``command`` can never be executed, or None (NUL, a string too long)."""
    strings = [command] if isinstance(command, str) else command
    for i, s in enumerate(strings):
        where = "command" if isinstance(command, str) else f"argv[{i}]"
        if "\x00" in s:
            return f"{where} contains a NUL byte"
        size = _utf8_size(s)
        if size > COMMAND_STRING_MAX:
            return f"{where} is {size} bytes, more than {COMMAND_STRING_MAX}"
    return None


def env_problem(env: Mapping[str, str]) -> str | None:
    """Why ``env`` can never be passed to a process, or None."""
    for key, value in env.items():
        if not _ENV_NAME.match(key):
            return f"invalid environment variable name {key!r}"
        if "\x00" in value:
            return f"environment variable {key!r} contains a NUL byte"
        size = _utf8_size(key) + 1 + _utf8_size(value)
        if size > COMMAND_STRING_MAX:
            return f"environment variable {key!r} is {size} bytes, more than {COMMAND_STRING_MAX}"
    return None


def exec_size(command: str | list[str], env: Mapping[str, str]) -> int:
    """What a command and its environment take of the kernel's ARG_MAX, roughly
    (a shell command runs as ``sh -c command``)."""
    argv = ["/bin/sh", "-c", command] if isinstance(command, str) else command
    size = sum(_utf8_size(a) + 1 for a in argv)
    return size + sum(_utf8_size(k) + _utf8_size(v) + 2 for k, v in env.items())


def _strings(value: Any, loc: tuple[str, ...]) -> Iterator[tuple[tuple[str, ...], str]]:
    """Every string (keys too) of parsed JSON, with its location."""
    if isinstance(value, str):
        yield loc, value
    elif isinstance(value, dict):
        for k, v in value.items():
            where = (*loc, str(k).encode("utf-8", "backslashreplace").decode())
            yield from _strings(k, where)
            yield from _strings(v, where)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _strings(v, (*loc, str(i)))


def _unencodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def unencodable_string(value: Any) -> tuple[str, ...] | None:
    """The location of the first string (or key) in parsed JSON that UTF-8 cannot
    encode (a lone surrogate escape such as ``"\\udc00"``), or None."""
    return next((loc for loc, s in _strings(value, ()) if _unencodable(s)), None)


def nul_string(value: Any) -> tuple[str, ...] | None:
    """The location of the first string (or key) holding a NUL, or None: no
    PostgreSQL text column can store one (SQLite would, unlike the other store)."""
    return next((loc for loc, s in _strings(value, ()) if "\x00" in s), None)


def replace_nul(text: str) -> str:
    """Program output or an error text with its NULs as U+FFFD: kept, but storable."""
    return text.replace("\x00", "\ufffd")


#: Cheap pre-checks on a raw JSON body: only a body with a surrogate or NUL
#: escape is walked.
SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
NUL_ESCAPE = b"\\u0000"
