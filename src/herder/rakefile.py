"""Rakefile parser (DESIGN §3, seeds/003).

A Rakefile is the plain-text job format of the original "rake" distributed
build. Grammar, line by line:

- Everything from ``#`` to the end of a line is a comment; afterwards lines
  that are empty or hold only white space are skipped.
- A line with no leading tab is one of:

  - ``PORT = n`` -- the default port of ``HOSTS`` entries (default 6238,
    1..65535);
  - ``HOSTS = h1 h2:port ...`` -- agents for direct mode (§9); a host given
    without a port uses ``PORT``, wherever the ``PORT`` line is in the file;
    IPv6 addresses are written in brackets (``[::1]:7000``);
  - ``name:`` -- an actionset header. Actionsets run in file order.

- A line starting with one tab is an action (a shell command) of the latest
  actionset. ``remote-cmd ...`` runs ``cmd ...`` on an agent; any other action
  runs on the submitting machine. An action's first word may not be
  ``requires`` (that belongs two tabs deep).
- A line starting with two tabs is ``requires f1 f2 ...`` for the action
  directly above it (several such lines accumulate). Paths are relative to
  the job root and are normalised (``./src/a.c`` is ``src/a.c``); ``..`` and
  absolute paths are refused. Duplicates are dropped.
- Tabs and spaces separate words anywhere inside a line. Spaces may follow
  the indenting tabs (alignment), but an indent may not start with a space,
  nor may a tab follow a space inside it.
- Control characters (other than the tab) are refused anywhere, C1 ones
  (U+0080..U+009F) included: a terminal would act on them when the build is
  shown. An actionset name has at most :data:`MAX_SET_NAME` characters, an
  actionset at most :data:`MAX_ACTIONS` actions (a job's task limit).

A file that cannot be read as a Rakefile (missing, a directory, a FIFO or a
device, larger than :data:`herder.inputs.MAX_SOURCE_BYTES`, not UTF-8) is a
:class:`RakefileError` at ``1:1`` (or at the bad byte), and so is a required
file that cannot be sent (:func:`requires_error`, at the path's column).

Every problem is reported as a :class:`RakefileError` whose ``str()`` is the
one-line ``"path:line:col: message"`` (1-based line and column; a tab counts
as one column).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from herder.api_limits import MAX_TASKS_PER_JOB
from herder.api_models import JobSubmit, RequiredFile, StageSpec, TaskSpec
from herder.hostspec import parse_host
from herder.inputs import SourceProblem, read_source, required_file_problem
from herder.paths import UnsafePath, normalize_relpath

__all__ = [
    "DEFAULT_PORT",
    "MAX_ACTIONS",
    "MAX_SET_NAME",
    "REMOTE_PREFIX",
    "Action",
    "Actionset",
    "Host",
    "MissingDigestError",
    "Rakefile",
    "RakefileError",
    "decode_rakefile",
    "load_rakefile",
    "parse_host",
    "parse_rakefile",
    "render_rakefile",
    "requires_error",
    "to_job_submit",
]

DEFAULT_PORT = 6238
REMOTE_PREFIX = "remote-"
#: An actionset is one job of the farm: at most its task limit of actions.
MAX_ACTIONS = MAX_TASKS_PER_JOB
#: Room for the job name ``"{rakefile}: {actionset}"`` within the API's 200 characters.
MAX_SET_NAME = 100

_ASSIGN_RE = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)[ \t]*=")
_PORT_RE = re.compile(r"[0-9]+", re.ASCII)
_WORD_RE = re.compile(r"[^ \t]+")


class RakefileError(Exception):
    """A Rakefile that cannot be read; ``str()`` is ``path:line:col: message``."""

    def __init__(self, path: str, line: int, col: int, message: str) -> None:
        self.path = path
        self.line = line
        self.col = col
        self.message = message
        super().__init__(f"{path}:{line}:{col}: {message}")

    def __str__(self) -> str:
        return f"{self.path}:{self.line}:{self.col}: {self.message}"

    def __reduce__(self) -> tuple[type[RakefileError], tuple[str, int, int, str]]:
        return (type(self), (self.path, self.line, self.col, self.message))


class MissingDigestError(ValueError):
    """``to_job_submit`` was not given the digest of a required file."""


@dataclass(frozen=True)
class Host:
    name: str
    port: int

    def __str__(self) -> str:
        name = f"[{self.name}]" if ":" in self.name else self.name
        return f"{name}:{self.port}"


@dataclass(frozen=True, slots=True)
class Action:
    command: str
    """The command to run: for a remote action, without the ``remote-`` prefix."""
    remote: bool
    requires: list[str] = field(default_factory=list)
    line: int = 0
    where: tuple[tuple[int, int], ...] = field(default=(), compare=False, repr=False)
    """(line, column) of each of ``requires``, for errors about the files."""


@dataclass(frozen=True)
class Actionset:
    name: str
    line: int
    actions: list[Action]


@dataclass(frozen=True)
class Rakefile:
    port: int
    hosts: list[Host]
    actionsets: list[Actionset]


# ------------------------------------------------------------------ parsing


def _lstrip_ws(s: str) -> str:
    return s.lstrip(" \t")


def _bad_char(text: str) -> tuple[int, str] | None:
    """Index and description of the first character no Rakefile may hold."""
    for i, ch in enumerate(text):
        o = ord(ch)
        if ch == "\t":
            continue
        if o < 0x20 or 0x7F <= o <= 0x9F:
            return i, f"control character U+{o:04X} is not allowed"
        if 0xD800 <= o <= 0xDFFF:
            return i, f"lone surrogate U+{o:04X} is not valid Unicode"
    return None


class _Parser:
    def __init__(self, path: str) -> None:
        self.path = path
        self.port: int | None = None
        self.port_line = 0
        self.hosts: list[tuple[str, int | None]] | None = None
        self.hosts_line = 0
        # actionsets under construction: (name, line, actions); an action is
        # (command, remote, requires, line, where each of requires is)
        self.sets: list[
            tuple[str, int, list[tuple[str, bool, list[str], int, list[tuple[int, int]]]]]
        ] = []
        self.set_lines: dict[str, int] = {}
        # kind of the latest significant line: "none", "setting", "header", "action", "requires"
        self.last = "none"

    def err(self, line: int, col: int, message: str) -> RakefileError:
        return RakefileError(self.path, line, col, message)

    # -- entry point
    def parse(self, text: str) -> Rakefile:
        if text.startswith("\ufeff"):
            text = text[1:]
        lines = text.split("\n")
        for idx, raw in enumerate(lines):
            lineno = idx + 1
            if raw.endswith("\r"):
                raw = raw[:-1]
            hash_at = raw.find("#")
            line = raw if hash_at < 0 else raw[:hash_at]
            bad = _bad_char(line)
            if bad is not None:
                raise self.err(lineno, bad[0] + 1, bad[1])
            if not line.strip():
                continue
            self.line(lineno, line)
        self.close_set()
        if not self.sets:
            raise self.err(
                1,
                1,
                "no actionsets: expected a header line 'name:' followed by actions indented with one tab",
            )
        port = DEFAULT_PORT if self.port is None else self.port
        hosts = [Host(n, port if p is None else p) for n, p in (self.hosts or [])]
        return Rakefile(
            port=port,
            hosts=hosts,
            actionsets=[
                Actionset(
                    name=n,
                    line=ln,
                    actions=[
                        Action(command=c, remote=r, requires=q, line=al, where=tuple(w))
                        for c, r, q, al, w in acts
                    ],
                )
                for n, ln, acts in self.sets
            ],
        )

    def close_set(self) -> None:
        if self.sets and not self.sets[-1][2]:
            name, ln, _ = self.sets[-1]
            raise self.err(
                ln,
                1,
                f"actionset {name!r} has no actions; expected at least one line indented with one tab",
            )

    def line(self, lineno: int, line: str) -> None:
        tabs = len(line) - len(line.lstrip("\t"))
        if tabs == 0 and line[0].isspace():
            raise self.err(
                lineno,
                1,
                "indent with a tab, not spaces (one tab for an action, two for 'requires')",
            )
        if tabs >= 3:
            raise self.err(
                lineno,
                3,
                "too many tabs: expected a top-level line (no tab), an action (one tab) "
                "or 'requires ...' (two tabs)",
            )
        rest = line[tabs:]
        stripped = _lstrip_ws(rest)
        indent = rest[: len(rest) - len(stripped)]
        if "\t" in indent:
            sp = indent.index(" ")
            raise self.err(
                lineno,
                tabs + sp + 1,
                "indentation mixes spaces and tabs: indent with tabs only "
                "(one tab for an action, two for 'requires')",
            )
        col0 = tabs + len(indent)  # 0-based column of the first character of content
        content = stripped.rstrip(" \t")
        if tabs == 0:
            self.top_level(lineno, content)
        elif tabs == 1:
            self.action(lineno, col0, content)
        else:
            self.requires(lineno, col0, content)

    # -- top-level lines
    def top_level(self, lineno: int, content: str) -> None:
        m = _ASSIGN_RE.match(content)
        if m is not None:
            key = m.group(1)
            value_off = len(_lstrip_ws(content[m.end() :]))
            value_col0 = len(content) - value_off
            value = content[value_col0:]
            if key == "PORT":
                self.set_port(lineno, value_col0, value)
            elif key == "HOSTS":
                self.set_hosts(lineno, value_col0, value)
            else:
                hint = " (setting names are upper-case)" if key.upper() in ("PORT", "HOSTS") else ""
                raise self.err(lineno, 1, f"unknown setting {key!r}; expected PORT or HOSTS{hint}")
            self.last = "setting"
            return
        colon = content.find(":")
        if colon < 0:
            raise self.err(
                lineno,
                1,
                f"unexpected line {content!r}: expected 'PORT = n', 'HOSTS = host ...' "
                "or an actionset header 'name:' (actions are indented with one tab)",
            )
        name = content[:colon]
        after = content[colon + 1 :]
        if after.strip(" \t"):
            col0 = colon + 1 + (len(after) - len(_lstrip_ws(after)))
            raise self.err(
                lineno,
                col0 + 1,
                f"unexpected text after actionset header '{name.rstrip()}:'; "
                "an action goes on its own line, indented with one tab",
            )
        name = name.rstrip(" \t")
        if not name:
            raise self.err(lineno, colon + 1, "actionset name is empty; expected 'name:'")
        ws = next((i for i, c in enumerate(name) if c.isspace()), -1)
        if ws >= 0:
            raise self.err(lineno, ws + 1, f"actionset name {name!r} must not contain white space")
        if len(name) > MAX_SET_NAME:
            raise self.err(
                lineno, 1, f"actionset name is {len(name)} characters long; at most {MAX_SET_NAME}"
            )
        if name in self.set_lines:
            raise self.err(
                lineno,
                1,
                f"duplicate actionset {name!r} (first defined at line {self.set_lines[name]})",
            )
        self.close_set()
        self.sets.append((name, lineno, []))
        self.set_lines[name] = lineno
        self.last = "header"

    def set_port(self, lineno: int, col0: int, value: str) -> None:
        if self.port is not None:
            raise self.err(lineno, 1, f"duplicate PORT (first set at line {self.port_line})")
        if not value:
            raise self.err(
                lineno, col0 + 1, "PORT needs a value: expected 'PORT = n' with n in 1..65535"
            )
        if not _PORT_RE.fullmatch(value):
            bad = next((i for i, c in enumerate(value) if not ("0" <= c <= "9")), 0)
            raise self.err(
                lineno,
                col0 + bad + 1,
                f"PORT {value!r} is not an integer; expected 'PORT = n' with n in 1..65535",
            )
        port = int(value)
        if not 1 <= port <= 65535:
            raise self.err(lineno, col0 + 1, f"PORT {port} is out of range 1..65535")
        self.port = port
        self.port_line = lineno

    def set_hosts(self, lineno: int, col0: int, value: str) -> None:
        if self.hosts is not None:
            raise self.err(lineno, 1, f"duplicate HOSTS (first set at line {self.hosts_line})")
        if not value:
            raise self.err(
                lineno,
                col0 + 1,
                "HOSTS needs at least one host: expected 'HOSTS = host host:port ...'",
            )
        hosts: list[tuple[str, int | None]] = []
        for m in _WORD_RE.finditer(value):
            try:
                hosts.append(parse_host(m.group(0), None))
            except ValueError as exc:
                off = exc.args[1] if len(exc.args) > 1 and isinstance(exc.args[1], int) else 0
                raise self.err(
                    lineno, col0 + m.start() + off + 1, f"bad host {m.group(0)!r}: {exc.args[0]}"
                ) from None
        self.hosts = hosts
        self.hosts_line = lineno

    # -- indented lines
    def action(self, lineno: int, col0: int, content: str) -> None:
        if not self.sets:
            raise self.err(
                lineno,
                col0 + 1,
                "action before any actionset header; expected a header line 'name:' first",
            )
        first = _WORD_RE.match(content)
        if first is not None and first.group(0) == "requires":
            raise self.err(
                lineno,
                col0 + 1,
                "'requires' must be indented with two tabs, under the action it belongs to",
            )
        remote = content.startswith(REMOTE_PREFIX)
        command = content
        if remote:
            command = _lstrip_ws(content[len(REMOTE_PREFIX) :])
            if not command:
                raise self.err(
                    lineno,
                    col0 + len(REMOTE_PREFIX) + 1,
                    "expected a command after 'remote-' (e.g. 'remote-cc -c a.c')",
                )
        if len(self.sets[-1][2]) >= MAX_ACTIONS:
            raise self.err(
                lineno,
                col0 + 1,
                f"actionset {self.sets[-1][0]!r} has more than {MAX_ACTIONS} actions "
                "(an actionset is one job of the farm)",
            )
        self.sets[-1][2].append((command, remote, [], lineno, []))
        self.last = "action"

    def requires(self, lineno: int, col0: int, content: str) -> None:
        m = _WORD_RE.match(content)
        word = m.group(0) if m else ""
        if word != "requires":
            raise self.err(
                lineno, col0 + 1, "a line indented with two tabs must be 'requires file ...'"
            )
        if self.last not in ("action", "requires"):
            what = {
                "none": "nothing",
                "setting": "a PORT/HOSTS line",
                "header": "an actionset header",
            }[self.last]
            raise self.err(
                lineno,
                col0 + 1,
                f"'requires' must follow an action (a line indented with one tab), not {what}",
            )
        files_off = len("requires")
        files = list(_WORD_RE.finditer(content, files_off))
        if not files:
            raise self.err(
                lineno,
                col0 + files_off + 1,
                "'requires' needs at least one file: expected 'requires f1 f2 ...'",
            )
        reqs, where = self.sets[-1][2][-1][2], self.sets[-1][2][-1][4]
        for f in files:
            try:
                p = normalize_relpath(f.group(0))
            except UnsafePath as exc:
                raise self.err(lineno, col0 + f.start() + 1, str(exc)) from None
            if p not in reqs:
                reqs.append(p)
                where.append((lineno, col0 + f.start() + 1))
        self.last = "requires"


def parse_rakefile(text: str, path: str = "Rakefile") -> Rakefile:
    """Parse Rakefile text; raise :class:`RakefileError` on any problem."""
    return _Parser(path).parse(text)


def decode_rakefile(data: bytes, path: str = "Rakefile") -> str:
    """Decode UTF-8 strictly; an invalid byte is a :class:`RakefileError` at its line."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line_start = data.rfind(b"\n", 0, exc.start) + 1
        line = data.count(b"\n", 0, exc.start) + 1
        col = len(data[line_start : exc.start].decode("utf-8", errors="replace")) + 1
        raise RakefileError(
            path,
            line,
            col,
            f"invalid UTF-8 byte 0x{data[exc.start]:02x}; a Rakefile must be UTF-8 text",
        ) from None


def load_rakefile(path: Path | str) -> Rakefile:
    """Read and parse a Rakefile; :class:`RakefileError` for any problem, reading included."""
    p = Path(path)
    try:
        data = read_source(p)
    except SourceProblem as exc:
        raise RakefileError(str(p), 1, 1, f"cannot read the Rakefile: it {exc}") from None
    return parse_rakefile(decode_rakefile(data, str(p)), str(p))


def requires_error(path: str, action: Action, root: Path) -> RakefileError | None:
    """The error for the first of ``action``'s required files that cannot be sent, or None.

    Located at the file's word in its ``requires`` line (see :mod:`herder.inputs`).
    """
    for i, rel in enumerate(action.requires):
        problem = required_file_problem(root, rel)
        if problem is not None:
            line, col = action.where[i] if i < len(action.where) else (action.line, 1)
            return RakefileError(path, line, col, problem)
    return None


# ------------------------------------------------------------------ output


def render_rakefile(rf: Rakefile, *, explicit_ports: bool = True) -> str:
    """Render a model back to Rakefile text that parses to an equal model."""
    out: list[str] = []
    if rf.port != DEFAULT_PORT:
        out.append(f"PORT = {rf.port}")
    if rf.hosts:
        out.append(
            "HOSTS = "
            + " ".join(
                str(h)
                if explicit_ports or h.port != rf.port
                else (f"[{h.name}]" if ":" in h.name else h.name)
                for h in rf.hosts
            )
        )
    for aset in rf.actionsets:
        if out:
            out.append("")
        out.append(f"{aset.name}:")
        for a in aset.actions:
            out.append("\t" + (REMOTE_PREFIX if a.remote else "") + a.command)
            if a.requires:
                out.append("\t\trequires " + " ".join(a.requires))
    return "\n".join(out) + "\n"


def to_job_submit(
    rf: Rakefile,
    *,
    name: str,
    digests: Mapping[str, str],
    modes: Mapping[str, int] | None = None,
    pool: str = "default",
    priority: int = 0,
    owner: str | None = None,
    idempotency_key: str | None = None,
) -> JobSubmit:
    """Map actionsets to stages and actions to tasks.

    ``digests`` (and optional ``modes``) are keyed by the normalised relative
    path of each required file. Tasks are named ``"{actionset}[{i}]"`` with
    ``i`` counting from 0 within the actionset.
    """
    stages: list[StageSpec] = []
    for aset in rf.actionsets:
        tasks: list[TaskSpec] = []
        for i, act in enumerate(aset.actions):
            reqs: list[RequiredFile] = []
            for p in act.requires:
                digest = digests.get(p)
                if digest is None:
                    raise MissingDigestError(
                        f"no digest for required file {p!r} (action {aset.name}[{i}], line {act.line})"
                    )
                mode = None if modes is None else modes.get(p)
                reqs.append(RequiredFile(path=p, digest=digest, mode=mode))
            tasks.append(
                TaskSpec(
                    name=f"{aset.name}[{i}]",
                    command=act.command,
                    placement="remote" if act.remote else "local",
                    requires=reqs,
                )
            )
        stages.append(StageSpec(name=aset.name, tasks=tasks))
    return JobSubmit(
        name=name,
        owner=owner,
        pool=pool,
        priority=priority,
        idempotency_key=idempotency_key,
        stages=stages,
    )
