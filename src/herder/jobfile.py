"""TOML job files: what a Rakefile cannot say (DESIGN §2, §3).

A job file parses into the same job model as a Rakefile. Example::

    name = "shot-010"            # job name (default: the file's stem)
    priority = 10                # -1000..1000, default 0
    pool = "render"              # default "default"
    owner = "alice"              # optional
    idempotency_key = "shot-010-v3"   # optional
    depends_on = [41, 42]        # optional: ids of jobs that must succeed first
    on_parent_failure = "hold"   # "fail" (default) or "hold"
    frame_order = "first-last-middle"  # or "sequential" (default)

    [defaults]                   # optional: task fields every task starts from
    tags = ["blender"]
    max_attempts = 3
    env = { OCIO = "/studio/ocio.cfg" }

    [[stage]]
    name = "prepare"

    [[stage.task]]
    command = "python bake.py"   # a shell string, or an argv list
    requires = ["bake.py", "assets/scene.blend"]
    placement = "local"

    [[stage]]
    name = "render"

    [[stage.frames]]
    command = "blender -b assets/scene.blend -o out/f_#### -s {start} -e {end} -j {step} -a"
    frames = "1-240x2"           # also "1-10,20,30-40x5"
    chunk = 10                   # frames per task (default 1)
    requires = ["assets/scene.blend"]
    outputs = ["out"]
    cpus = 8
    ram_mb = 16000

Keys
----
Top level: ``name``, ``priority``, ``pool``, ``owner``, ``idempotency_key``,
``depends_on``, ``on_parent_failure``, ``frame_order``, ``defaults`` (a
table), ``stage`` (an array of tables). Stages run in file order; each needs
a ``name`` and at least one task. A stage's tasks are its ``[[stage.task]]``
entries followed by the tasks its ``[[stage.frames]]`` entries expand into.
``depends_on``: the job waits until every job named succeeded; one that fails
fails it too (``on_parent_failure = "fail"``) or holds it until that job is
retried and succeeds (``"hold"``). ``frame_order = "first-last-middle"``:
each stage starts its first task, its last, then middle-out (early previews).

Task fields (in ``[[stage.task]]``, ``[[stage.frames]]`` and ``[defaults]``):
``name``, ``command`` (string or list of strings), ``placement`` (``"remote"``
or ``"local"``), ``requires`` (paths relative to the job root), ``outputs``
(paths to bring back; absent means every created or changed file), ``env``
(a table of strings), ``timeout_s``, ``max_attempts``, ``tags``, ``cpus``,
``ram_mb``, ``gpus``, ``progress_pattern`` (a regex whose one group is the progress,
0-100, in an output line), ``stuck_timeout_s`` (kill after this long without
output). A task's value replaces the default's, except ``env``, which is
merged (the task's variables win). ``name`` and ``command`` cannot be
defaults.

Frame templates
---------------
A ``[[stage.frames]]`` entry also has ``frames`` (required) and ``chunk``
(default 1). ``frames`` is a comma-separated list of items, each ``N``,
``A-B`` or ``A-BxS`` (every S-th frame from A up to B; frames are integers
0..2**31-1, ``A <= B``, ``S >= 1``; a frame may not appear twice). Each item is cut
into chunks of ``chunk`` frames *of that item's sequence*, so a chunk never
spans two items and is always ``start, start+step, ..., end``. Each chunk
becomes one task, named ``"{name}[{start}-{end}]"`` (``"{name}[{start}]"``
for a one-frame chunk; ``name`` defaults to the stage's name). In
``command`` (each element, for an argv list), ``outputs`` and ``env`` values
these placeholders are replaced, and other braces are left alone for the
shell: ``{start}``, ``{end}`` (first and last frame of the chunk),
``{step}``, ``{frames}`` (the chunk's frames joined with ``,``), ``{count}``
(frames in the chunk) and ``{index}`` (the chunk's number, from 0). A
Python format spec may follow: ``{start:04d}``.

Errors are :class:`JobFileError`: ``"file:line:col: message"``, the position
of a TOML syntax error, or of the bad key or value (located by a scan of the
file: a key the scan cannot place is given at its nearest located parent,
else at ``1:1``). The message names the key path, e.g.
``stage[1].task[0].comand`` (indices count from 0). Names (of the job, its
stages and tasks, its pool, owner, idempotency key and tags) may not hold
control characters. Frames are at most :data:`~herder.frames.MAX_FRAME`,
and a job has at most ``MAX_TASKS_PER_JOB`` tasks: a frame template that
would make more is refused from its arithmetic, before it is expanded.

Required files need digests before submission: :func:`load_jobfile` returns
a :class:`JobFile` with relative paths, and :func:`to_job_submit` turns it
into the API's ``JobSubmit`` given a digest for each path of
:meth:`JobFile.required_paths`.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from pydantic import ValidationError

from herder.api_limits import INT64_MAX, MAX_TASKS_PER_JOB
from herder.api_models import (
    DEPENDS_ON_MAX,
    FrameOrder,
    OnParentFailure,
    TaskSpec,
)
from herder.display import control_problem
from herder.frames import (
    MAX_FRAMES,
    FrameChunk,
    FrameRange,
    FrameSpecError,
    chunk_frames,
    count_chunks,
    expand_template,
    parse_frame_ranges,
    parse_frames,
)
from herder.inputs import BadEncoding, SourceProblem, decode_utf8, read_source
from herder.jobfile_base import JobFileError, _tname, to_job_submit
from herder.paths import UnsafePath, normalize_relpath
from herder.rakefile import MissingDigestError
from herder.tomllocate import KeyPath, fmt_path, locate_keys

__all__ = [
    "MAX_FRAMES",
    "FrameChunk",
    "FrameRange",
    "FrameSpecError",
    "JobFile",
    "JobFileError",
    "JobStage",
    "JobTask",
    "MissingDigestError",
    "chunk_frames",
    "expand_template",
    "load_jobfile",
    "parse_frame_ranges",
    "parse_frames",
    "parse_jobfile",
    "to_job_submit",
]

_TASK_FIELDS = (
    "name",
    "command",
    "placement",
    "requires",
    "outputs",
    "env",
    "timeout_s",
    "max_attempts",
    "tags",
    "cpus",
    "ram_mb",
    "gpus",
    "progress_pattern",
    "stuck_timeout_s",
)
_JOB_KEYS = (
    "name",
    "priority",
    "pool",
    "owner",
    "idempotency_key",
    "depends_on",
    "on_parent_failure",
    "frame_order",
    "defaults",
    "stage",
)
_STAGE_KEYS = ("name", "task", "frames")
_FRAME_KEYS = (*_TASK_FIELDS, "frames", "chunk")
_DEFAULT_KEYS = tuple(k for k in _TASK_FIELDS if k not in ("name", "command"))


# ------------------------------------------------------------------ model


@dataclass(frozen=True)
class JobTask:
    command: str | list[str]
    name: str | None = None
    placement: Literal["remote", "local"] = "remote"
    requires: list[str] = field(default_factory=list)
    outputs: list[str] | None = None
    env: dict[str, str] = field(default_factory=dict)
    timeout_s: float | None = None
    max_attempts: int = 1
    tags: list[str] = field(default_factory=list)
    cpus: int = 1
    ram_mb: int = 0
    gpus: int = 0
    progress_pattern: str | None = None
    stuck_timeout_s: float | None = None
    frames: list[int] | None = None
    """For a task expanded from a frame template: the frames it renders."""
    source: KeyPath = field(default=(), compare=False, repr=False)
    """Where in the file the task (or its frame template) is, for errors."""


@dataclass(frozen=True)
class JobStage:
    name: str
    tasks: list[JobTask]


@dataclass(frozen=True)
class JobFile:
    name: str
    stages: list[JobStage]
    priority: int = 0
    pool: str = "default"
    owner: str | None = None
    idempotency_key: str | None = None
    depends_on: list[int] = field(default_factory=list)
    on_parent_failure: OnParentFailure = "fail"
    frame_order: FrameOrder = "sequential"
    path: str = "job.toml"
    text: str = field(default="", compare=False, repr=False)
    """The file's text, to locate errors found after parsing (:meth:`error_at`)."""

    def error_at(self, key: KeyPath, message: str) -> JobFileError:
        """A located error about ``key`` (e.g. a task's ``requires``)."""
        return _Loader(self.path, self.text).error(key, message)

    def required_paths(self) -> list[str]:
        """Every required path, once, in order of first use."""
        seen: dict[str, None] = {}
        for s in self.stages:
            for t in s.tasks:
                for p in t.requires:
                    seen.setdefault(p, None)
        return list(seen)


# ------------------------------------------------------------------ loading


class _Loader:
    def __init__(self, path: str, text: str) -> None:
        self.path = path
        self.text = text
        self._where: dict[KeyPath, tuple[int, int]] | None = None
        self.task_count = 0

    def room_for(self, tasks: int, key: KeyPath, what: str = "") -> None:
        """Count ``tasks`` more tasks; refuse them before they are made if the job would
        exceed its task limit."""
        self.task_count += tasks
        if self.task_count > MAX_TASKS_PER_JOB:
            raise self.error(
                key,
                f"{what}the job would have {self.task_count} tasks or more; "
                f"a job may have at most {MAX_TASKS_PER_JOB}",
            )

    def error(self, key: KeyPath, message: str) -> JobFileError:
        if self._where is None:
            self._where = locate_keys(self.text)
        pos = None
        for n in range(len(key), 0, -1):  # the key itself, else its nearest located parent
            pos = self._where.get(key[:n])
            if pos is not None:
                break
        name = fmt_path(key)
        msg = f"{name}: {message}" if name else message
        line, col = pos or (1, 1)
        return JobFileError(self.path, msg, line, col, key=name or None)

    # -- generic checks
    def table(self, value: object, key: KeyPath) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.error(key, f"expected a table, got {_tname(value)}")
        return value

    def array_of_tables(self, value: object, key: KeyPath) -> list[dict[str, Any]]:
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise self.error(
                key, f"expected an array of tables ([[{fmt_path(key)}]]), got {_tname(value)}"
            )
        return value

    def known(
        self, tbl: Mapping[str, object], allowed: Sequence[str], key: KeyPath, what: str
    ) -> None:
        for k in tbl:
            if k not in allowed:
                raise self.error(
                    (*key, k), f"unknown key {k!r} in {what}; expected one of: {', '.join(allowed)}"
                )

    def string(
        self, value: object, key: KeyPath, *, nonempty: bool = True, name: bool = False
    ) -> str:
        if not isinstance(value, str):
            raise self.error(key, f"expected a string, got {_tname(value)}")
        if nonempty and not value.strip():
            raise self.error(key, "must not be empty")
        bad = control_problem(value) if name else None
        if bad is not None:
            raise self.error(key, bad[1])
        return value

    def integer(self, value: object, key: KeyPath, lo: int, hi: int | None = None) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(key, f"expected an integer, got {_tname(value)}")
        if value < lo or (hi is not None and value > hi):
            rng = f"{lo}..{hi}" if hi is not None else f">= {lo}"
            raise self.error(key, f"{value} is out of range ({rng})")
        return value

    def parents(self, value: object, key: KeyPath) -> list[int]:
        """``depends_on``: job ids, each once (their existence is the farm's to check)."""
        if not isinstance(value, list):
            raise self.error(key, f"expected an array of job ids, got {_tname(value)}")
        if len(value) > DEPENDS_ON_MAX:
            raise self.error(key, f"{len(value)} jobs, more than {DEPENDS_ON_MAX}")
        ids = [self.integer(v, (*key, i), 1, INT64_MAX) for i, v in enumerate(value)]
        return list(dict.fromkeys(ids))

    def choice(self, tbl: Mapping[str, object], name: str, allowed: Sequence[str]) -> str:
        value = self.string(tbl.get(name, allowed[0]), (name,))
        if value not in allowed:
            expected = " or ".join(f'"{a}"' for a in allowed)
            raise self.error((name,), f"expected {expected}, got {value!r}")
        return value

    def strings(self, value: object, key: KeyPath, *, names: bool = False) -> list[str]:
        if not isinstance(value, list):
            raise self.error(key, f"expected an array of strings, got {_tname(value)}")
        for i, v in enumerate(value):
            if not isinstance(v, str):
                raise self.error((*key, i), f"expected a string, got {_tname(v)}")
            bad = control_problem(v) if names else None
            if bad is not None:
                raise self.error((*key, i), bad[1])
        return list(value)

    def relpaths(self, value: object, key: KeyPath) -> list[str]:
        out: list[str] = []
        for i, p in enumerate(self.strings(value, key)):
            try:
                n = normalize_relpath(p)
            except UnsafePath as exc:
                raise self.error((*key, i), str(exc)) from None
            if n not in out:
                out.append(n)
        return out

    # -- task fields
    def task_fields(self, tbl: Mapping[str, Any], key: KeyPath) -> dict[str, Any]:
        """Type-check the task fields present in ``tbl``."""
        out: dict[str, Any] = {}
        for k, v in tbl.items():
            kk = (*key, k)
            if k not in _TASK_FIELDS:
                continue
            if k == "name":
                out[k] = self.string(v, kk, name=True)
            elif k == "command":
                if isinstance(v, str):
                    out[k] = self.string(v, kk)
                else:
                    cmd = self.strings(v, kk)
                    if not cmd or not cmd[0]:
                        raise self.error(kk, "an argv command needs a non-empty first element")
                    out[k] = cmd
            elif k == "placement":
                out[k] = self.string(v, kk)
                if v not in ("remote", "local"):
                    raise self.error(kk, f'expected "remote" or "local", got {v!r}')
            elif k in ("requires", "outputs"):
                out[k] = self.relpaths(v, kk)
            elif k == "tags":
                out[k] = self.strings(v, kk, names=True)
            elif k == "env":
                env = self.table(v, kk)
                for ek, ev in env.items():
                    if not isinstance(ev, str):
                        raise self.error((*kk, ek), f"expected a string, got {_tname(ev)}")
                out[k] = dict(env)
            elif k == "progress_pattern":
                out[k] = self.string(v, kk)
            elif k in ("timeout_s", "stuck_timeout_s"):
                if isinstance(v, bool) or not isinstance(v, int | float):
                    raise self.error(kk, f"expected a number of seconds, got {_tname(v)}")
                out[k] = float(v)
            elif k == "max_attempts":
                out[k] = self.integer(v, kk, 1, 100)
            elif k in ("cpus", "ram_mb", "gpus"):
                out[k] = self.integer(v, kk, 0)
        return out

    def make_task(
        self, fields: dict[str, Any], defaults: Mapping[str, Any], key: KeyPath
    ) -> JobTask:
        merged = {**defaults, **fields}
        if "env" in defaults and "env" in fields:
            merged["env"] = {**defaults["env"], **fields["env"]}
        if "command" not in merged:
            raise self.error(key, "a task needs a 'command'")
        # the API's own rules (ranges, env names, ...)
        probe = {k: v for k, v in merged.items() if k not in ("requires", "frames")}
        try:
            TaskSpec.model_validate(probe)
        except ValidationError as exc:
            first = exc.errors()[0]
            loc = first.get("loc", ())
            sub: KeyPath = tuple(x for x in loc[:1] if isinstance(x, str))
            msg = str(first.get("msg", exc)).removeprefix("Value error, ")  # pydantic's prefix
            raise self.error((*key, *sub), msg) from None
        return JobTask(**merged, source=key)

    # -- the document
    def load(self, doc: dict[str, Any], default_name: str) -> JobFile:
        self.known(doc, _JOB_KEYS, (), "the job")
        name = self.string(doc.get("name", default_name), ("name",), name=True)
        if len(name) > 200:
            raise self.error(("name",), "is longer than 200 characters")
        priority = self.integer(doc.get("priority", 0), ("priority",), -1000, 1000)
        pool = self.string(doc.get("pool", "default"), ("pool",), name=True)
        owner = None if "owner" not in doc else self.string(doc["owner"], ("owner",), name=True)
        ikey = None
        if "idempotency_key" in doc:
            ikey = self.string(doc["idempotency_key"], ("idempotency_key",), name=True)
        depends_on = self.parents(doc.get("depends_on", []), ("depends_on",))
        on_failure = self.choice(doc, "on_parent_failure", ("fail", "hold"))
        frame_order = self.choice(doc, "frame_order", ("sequential", "first-last-middle"))
        defaults: dict[str, Any] = {}
        if "defaults" in doc:
            dtbl = self.table(doc["defaults"], ("defaults",))
            self.known(dtbl, _DEFAULT_KEYS, ("defaults",), "[defaults]")
            defaults = self.task_fields(dtbl, ("defaults",))
        if "stage" not in doc:
            raise JobFileError(
                self.path, "no stages: expected at least one [[stage]] with tasks", 1, 1
            )
        stages: list[JobStage] = []
        for si, st in enumerate(self.array_of_tables(doc["stage"], ("stage",))):
            skey: KeyPath = ("stage", si)
            self.known(st, _STAGE_KEYS, skey, "a [[stage]]")
            if "name" not in st:
                raise self.error(skey, "a stage needs a 'name'")
            sname = self.string(st["name"], (*skey, "name"), name=True)
            tasks: list[JobTask] = []
            for ti, t in enumerate(self.array_of_tables(st.get("task", []), (*skey, "task"))):
                tkey: KeyPath = (*skey, "task", ti)
                self.known(t, _TASK_FIELDS, tkey, "a [[stage.task]]")
                self.room_for(1, tkey)
                tasks.append(self.make_task(self.task_fields(t, tkey), defaults, tkey))
            for fi, fr in enumerate(self.array_of_tables(st.get("frames", []), (*skey, "frames"))):
                tasks.extend(self.frame_tasks(fr, (*skey, "frames", fi), defaults, sname))
            if not tasks:
                raise self.error(
                    skey, f"stage {sname!r} has no tasks; add [[stage.task]] or [[stage.frames]]"
                )
            stages.append(JobStage(sname, tasks))
        if not stages:
            raise self.error(("stage",), "no stages: expected at least one [[stage]] with tasks")
        return JobFile(
            name=name,
            stages=stages,
            priority=priority,
            pool=pool,
            owner=owner,
            idempotency_key=ikey,
            depends_on=depends_on,
            on_parent_failure=on_failure,  # type: ignore[arg-type]  # one of choice()'s values
            frame_order=frame_order,  # type: ignore[arg-type]
            path=self.path,
        )

    def frame_tasks(
        self, fr: dict[str, Any], key: KeyPath, defaults: Mapping[str, Any], stage_name: str
    ) -> list[JobTask]:
        self.known(fr, _FRAME_KEYS, key, "a [[stage.frames]]")
        if "frames" not in fr:
            raise self.error(key, "a frame template needs 'frames', e.g. frames = \"1-240x2\"")
        spec = self.string(fr["frames"], (*key, "frames"))
        try:
            ranges = parse_frame_ranges(spec)
        except FrameSpecError as exc:
            raise self.error(
                (*key, "frames"), f"{exc} (at character {exc.offset + 1} of {spec!r})"
            ) from None
        chunk = self.integer(fr.get("chunk", 1), (*key, "chunk"), 1)
        n = count_chunks(ranges, chunk)
        self.room_for(n, key, f"frames {spec[:40]!r} in chunks of {chunk} make {n} tasks: ")
        fields = self.task_fields(fr, key)
        base_name = fields.pop("name", stage_name)
        template = self.make_task(fields, defaults, key)  # validates the template as a task
        out: list[JobTask] = []
        for c in chunk_frames(ranges, chunk):
            label = f"{c.start}" if c.start == c.end else f"{c.start}-{c.end}"
            try:
                command: str | list[str] = (
                    expand_template(template.command, c)
                    if isinstance(template.command, str)
                    else [expand_template(a, c) for a in template.command]
                )
                outputs = (
                    None
                    if template.outputs is None
                    else [normalize_relpath(expand_template(o, c)) for o in template.outputs]
                )
                env = {k: expand_template(v, c) for k, v in template.env.items()}
            except (ValueError, TypeError) as exc:  # bad format spec, unsafe output path
                raise self.error(
                    key, f"cannot expand the template for frames {label}: {exc}"
                ) from None
            out.append(
                replace(
                    template,
                    name=f"{base_name}[{label}]",
                    command=command,
                    outputs=outputs,
                    env=env,
                    frames=c.frames,
                )
            )
        return out


_TOML_POS_RE = re.compile(r"^(.*) \(at line (\d+), column (\d+)\)$", re.S)


def parse_jobfile(text: str, path: str = "job.toml") -> JobFile:
    """Parse job-file text; raise :class:`JobFileError` on any problem."""
    try:
        doc = tomllib.loads(text)
    except RecursionError:
        raise JobFileError(path, "arrays or tables are nested too deeply", 1, 1) from None
    except tomllib.TOMLDecodeError as exc:
        msg = str(exc)
        m = _TOML_POS_RE.match(msg)
        if m is not None:
            raise JobFileError(path, m.group(1), int(m.group(2)), int(m.group(3))) from None
        if msg.endswith(" (at end of document)"):
            lines = text.split("\n")
            raise JobFileError(
                path,
                msg[: -len(" (at end of document)")] + " at end of file",
                len(lines),
                len(lines[-1]) + 1,
            ) from None
        raise JobFileError(path, msg, 1, 1) from None
    job = _Loader(path, text).load(doc, Path(path).stem or "job")
    return replace(job, text=text)


def load_jobfile(path: Path | str) -> JobFile:
    """Read and parse a TOML job file; :class:`JobFileError` for any problem, reading included."""
    p = Path(path)
    try:
        text = decode_utf8(read_source(p))
    except BadEncoding as exc:
        raise JobFileError(str(p), str(exc), exc.line, exc.col) from None
    except SourceProblem as exc:
        raise JobFileError(str(p), f"cannot read the job file: it {exc}", 1, 1) from None
    return parse_jobfile(text, str(p))
