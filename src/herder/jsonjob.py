"""JSON job files: the API's ``JobSubmit`` as a file, with errors at ``file:line:col``.

``json`` gives positions for syntax errors only; a value the API refuses is
placed by walking the text once more (:func:`locate_json`), only when there
is an error to place. Names (of the job, stages, tasks, pool, owner,
idempotency key, tags) may not hold control characters, as in TOML job files.
The job-level ``depends_on``, ``on_parent_failure`` and ``frame_order`` are
the API's own fields (``herder.store.deps``; ``herder.frames.dispatch_order``).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from herder.api_models import JobSubmit
from herder.display import control_problem
from herder.inputs import required_file_problem
from herder.jobfile import JobFileError
from herder.tomllocate import KeyPath, fmt_path

__all__ = ["locate_json", "parse_json_job"]

_WS = re.compile(r"[ \t\n\r]*")


def locate_json(text: str) -> dict[KeyPath, int]:
    """Offset of every member (its key) and array element of valid JSON ``text``."""
    where: dict[KeyPath, int] = {}
    scan = json.JSONDecoder().raw_decode
    from json.decoder import scanstring  # type: ignore[attr-defined]

    def value(i: int, path: KeyPath) -> int:
        i = _WS.match(text, i).end()  # type: ignore[union-attr]
        where.setdefault(path, i)
        c = text[i : i + 1]
        if c not in ("{", "["):
            return int(scan(text, i)[1])
        close, n = ("}" if c == "{" else "]"), 0
        i = _WS.match(text, i + 1).end()  # type: ignore[union-attr]
        while text[i] != close:
            if c == "{":
                key, end = scanstring(text, i + 1)
                where.setdefault((*path, key), i)
                i = _WS.match(text, end).end() + 1  # type: ignore[union-attr]  # past ':'
                i = value(i, (*path, key))
            else:
                i = value(i, (*path, n))
                n += 1
            i = _WS.match(text, i).end()  # type: ignore[union-attr]
            if text[i] == ",":
                i = _WS.match(text, i + 1).end()  # type: ignore[union-attr]
        return i + 1

    try:
        value(0, ())
    except (RecursionError, ValueError, IndexError):
        pass  # a best effort: what was placed so far still places errors
    return where


def _position(text: str, offset: int) -> tuple[int, int]:
    line = text.count("\n", 0, offset) + 1
    return line, offset - (text.rfind("\n", 0, offset) + 1) + 1


def _names(job: JobSubmit) -> list[tuple[KeyPath, str]]:
    out: list[tuple[KeyPath, str]] = [(("name",), job.name), (("pool",), job.pool)]
    for key in ("owner", "idempotency_key"):
        v = getattr(job, key)
        if v is not None:
            out.append(((key,), v))
    for si, s in enumerate(job.stages):
        out.append((("stages", si, "name"), s.name))
        for ti, t in enumerate(s.tasks):
            if t.name is not None:
                out.append((("stages", si, "tasks", ti, "name"), t.name))
            out.extend((("stages", si, "tasks", ti, "tags", i), g) for i, g in enumerate(t.tags))
    return out


def parse_json_job(text: str, path: str, root: Path | None = None) -> tuple[JobSubmit, list[str]]:
    """A ``JobSubmit`` from JSON text and the required paths to upload from ``root``.

    A required file that exists under ``root`` is uploaded, and must then be
    one that can be sent (:func:`herder.inputs.required_file_problem`); one
    that does not exist must already be in the farm's store. Any problem is a
    :class:`JobFileError`, always located.
    """
    located: dict[KeyPath, int] | None = None

    def error(key: KeyPath, message: str) -> JobFileError:
        nonlocal located
        if located is None:
            located = locate_json(text)
        offset = 0
        for n in range(len(key), -1, -1):  # the key itself, else its nearest located parent
            if key[:n] in located:
                offset = located[key[:n]]
                break
        name = fmt_path(key)
        line, col = _position(text, offset)
        return JobFileError(path, f"{name}: {message}" if name else message, line, col, name)

    try:
        data: Any = json.loads(text)
    except json.JSONDecodeError as exc:
        raise JobFileError(path, f"invalid JSON: {exc.msg}", exc.lineno, exc.colno) from None
    except RecursionError:
        raise JobFileError(path, "invalid JSON: nested too deeply", 1, 1) from None
    except ValueError as exc:  # e.g. an integer of more digits than Python converts
        raise JobFileError(path, f"invalid JSON: {exc}", 1, 1) from None
    try:
        job = JobSubmit.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        first = errors[0]
        key: KeyPath = tuple(x for x in first.get("loc", ()) if isinstance(x, str | int))
        more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
        raise error(_data_key(data, key), f"{first.get('msg', exc)}{more}") from None
    for key, value in _names(job):
        bad = control_problem(value)
        if bad is not None:
            raise error(key, bad[1])
    if root is None:
        return job, []
    uploads: dict[str, None] = {}
    for si, s in enumerate(job.stages):
        for ti, t in enumerate(s.tasks):
            for ri, r in enumerate(t.requires):
                if r.path in uploads or not os.path.lexists(root / r.path):
                    continue
                problem = required_file_problem(root, r.path)
                if problem is not None:
                    raise error(("stages", si, "tasks", ti, "requires", ri, "path"), problem)
                uploads[r.path] = None
    return job, sorted(uploads)


def _data_key(data: Any, loc: KeyPath) -> KeyPath:
    """The part of a pydantic location that names data, not a union member's type tag
    (``command.list[str]``): it stops where the data has no such member."""
    out: list[str | int] = []
    node = data
    for part in loc:
        if isinstance(node, dict) and isinstance(part, str):
            out.append(part)  # a missing or unknown key too: named, placed at its parent
            if part not in node:
                break
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            out.append(part)
            node = node[part]
        else:
            break
    return tuple(out)
