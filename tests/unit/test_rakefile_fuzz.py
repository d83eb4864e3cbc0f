"""Property tests for the Rakefile parser: it never fails with anything but a
RakefileError, and a valid model survives render -> parse unchanged."""

from __future__ import annotations

import os
import re

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from herder.paths import normalize_relpath
from herder.rakefile import (
    REMOTE_PREFIX,
    Action,
    Actionset,
    Host,
    Rakefile,
    RakefileError,
    decode_rakefile,
    parse_rakefile,
    render_rakefile,
)

# HERDER_FUZZ_EXAMPLES=5000 for a longer hunt; the default keeps the suite fast.
FUZZ = settings(
    max_examples=int(os.environ.get("HERDER_FUZZ_EXAMPLES", "300")),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


def _parse_or_error(text: str) -> None:
    try:
        rf = parse_rakefile(text)
    except RakefileError as e:
        assert e.line >= 1 and e.col >= 1
        assert "\n" not in str(e)
        assert str(e).startswith(f"Rakefile:{e.line}:{e.col}: ")
        return
    assert rf.actionsets
    assert all(s.actions for s in rf.actionsets)
    assert all(1 <= h.port <= 65535 for h in rf.hosts)


# ------------------------------------------------------------ never crashes


@FUZZ
@given(st.text())
def test_any_text(text: str) -> None:
    _parse_or_error(text)


@FUZZ
@given(st.binary())
def test_any_bytes(data: bytes) -> None:
    try:
        text = decode_rakefile(data)
    except RakefileError as e:
        assert e.line >= 1 and e.col >= 1
        return
    _parse_or_error(text)


FRAGMENTS = [
    "\t",
    "\t\t",
    "\t\t\t",
    " ",
    "  ",
    ":",
    "#",
    "=",
    "\n",
    "\n",
    "\n",
    "\r\n",
    "\r",
    "requires",
    "requires ",
    "remote-",
    "remote-cc",
    "PORT",
    "HOSTS",
    "PORT = ",
    "HOSTS = ",
    "a",
    "b.c",
    "./src/a.c",
    "../x",
    "/abs",
    "1",
    "0",
    "65536",
    "6238",
    "x:",
    "x:y",
    "[",
    "]",
    "[::1]",
    "h:80",
    "echo hi",
    "cc -c a.c",
    "\u00a0",
    "\x00",
    "\ufeff",
    "\u00e9",
    "port",
]


@FUZZ
@given(st.lists(st.sampled_from(FRAGMENTS), max_size=40))
def test_near_valid_fragments(parts: list[str]) -> None:
    _parse_or_error("".join(parts))


_word = st.sampled_from(["a", "b.c", "./s/a.c", "x", "remote-cc", "requires", "-c", "#c", "=", ":"])
_line = st.tuples(
    st.sampled_from(["", "\t", "\t\t", " ", "\t ", " \t", "\t\t\t"]),
    st.lists(_word, max_size=4),
    st.sampled_from(["", ":", " :", "\t", " # c", " = 1"]),
).map(lambda t: t[0] + " ".join(t[1]) + t[2])


@FUZZ
@given(st.lists(_line, max_size=20))
def test_near_valid_lines(lines: list[str]) -> None:
    _parse_or_error("\n".join(lines))


# ------------------------------------------------------------ round trip

_chars = st.one_of(
    st.characters(codec="utf-8", exclude_categories=("Cc", "Cs"), exclude_characters="#\ufeff"),
    st.sampled_from(" \t-_.=:/'\"$"),
)

names = st.text(_chars, min_size=1, max_size=12).filter(
    lambda s: not any(c.isspace() or c in ":=" for c in s)
)


def _ok_command(s: str) -> bool:
    if s != s.strip(" \t") or not s.strip():
        return False
    first = re.match(r"[^ \t]+", s)
    return first is not None and first.group(0) != "requires"


commands = st.text(_chars, min_size=1, max_size=30).filter(_ok_command)
_ALNUM = "abcxyzABZ0189_"
_segment = st.text(_ALNUM + ".-", min_size=1, max_size=8).filter(lambda s: s not in (".", ".."))
paths = (
    st.lists(_segment, min_size=1, max_size=3)
    .map("/".join)
    .filter(lambda p: normalize_relpath(p) == p)
)


@st.composite
def actions(draw: st.DrawFn) -> Action:
    remote = draw(st.booleans())
    cmd = draw(commands)
    if not remote and cmd.startswith(REMOTE_PREFIX):
        cmd = "x" + cmd
    reqs = draw(st.lists(paths, max_size=4, unique=True))
    return Action(cmd, remote, reqs, 0)


hostnames = st.one_of(
    st.builds(
        lambda a, mid, b: a + mid + b,
        st.sampled_from(_ALNUM),
        st.text(_ALNUM + ".-", max_size=8),
        st.sampled_from(_ALNUM),
    ),
    st.text(_ALNUM, min_size=1, max_size=3),
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(str),
)
ports = st.integers(1, 65535)


@st.composite
def rakefiles(draw: st.DrawFn) -> Rakefile:
    set_names = draw(st.lists(names, min_size=1, max_size=4, unique=True))
    sets = [Actionset(n, 0, draw(st.lists(actions(), min_size=1, max_size=4))) for n in set_names]
    hosts = draw(st.lists(st.builds(Host, hostnames, ports), max_size=4))
    return Rakefile(draw(ports), hosts, sets)


def _strip_lines(rf: Rakefile) -> Rakefile:
    return Rakefile(
        rf.port,
        rf.hosts,
        [
            Actionset(s.name, 0, [Action(a.command, a.remote, a.requires, 0) for a in s.actions])
            for s in rf.actionsets
        ],
    )


@FUZZ
@given(rakefiles(), st.booleans())
def test_round_trip(rf: Rakefile, explicit_ports: bool) -> None:
    text = render_rakefile(rf, explicit_ports=explicit_ports)
    parsed = parse_rakefile(text)
    assert _strip_lines(parsed) == rf
    # line numbers point at the lines that hold each header and action
    lines = text.split("\n")
    for s in parsed.actionsets:
        assert lines[s.line - 1] == f"{s.name}:"
        for a in s.actions:
            assert lines[a.line - 1] == "\t" + (REMOTE_PREFIX if a.remote else "") + a.command
            # each required file is located at its word, for errors about the file (issue 11)
            assert len(a.where) == len(a.requires)
            for req, (line, col) in zip(a.requires, a.where, strict=True):
                assert re.match(r"[^ \t]+", lines[line - 1][col - 1 :]).group(0) == req  # type: ignore[union-attr]


@FUZZ
@given(st.text(), st.characters(min_codepoint=0x80, max_codepoint=0x9F))
def test_c1_controls_refused_where_they_are(text: str, c1: str) -> None:
    # A C1 control (U+0080..U+009F) would act on a terminal showing the build (issue 11).
    src = "a:\n\techo " + re.sub(r"[#\r\n]", "", text) + c1 + "\n"
    try:
        parse_rakefile(src)
    except RakefileError as e:
        assert "control character" in e.message or "surrogate" in e.message, str(e)
        return
    raise AssertionError(f"accepted {src!r}")
